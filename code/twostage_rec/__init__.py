"""Two-stage recommender served from one SageMaker container.

Stage 1 retrieves candidates with a matrix-factorization dot product; stage 2 ranks them
with XGBoost over item features read from SageMaker Feature Store (or an embedded snapshot).
This package is the serving side: it never imports torch.
"""

__version__ = "0.1.0"
