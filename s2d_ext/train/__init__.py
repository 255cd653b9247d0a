"""Training: sorted fine-tuning (SoFT, :mod:`s2d_ext.train.soft`) and the local nested model family
(:mod:`s2d_ext.train.family`). Nothing in the decoding path imports this package."""
