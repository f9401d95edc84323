"""The offline demo: scikit-learn's bundled digits written as images (``data``) and run through every
stage (``pipeline``)."""
