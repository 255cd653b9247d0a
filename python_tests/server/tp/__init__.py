"""s2d serve --tp: tensor parallelism across processes."""
