"""Training: sorted fine-tuning (SoFT, :mod:`s2d_ext.train.soft`), the data a target writes itself for it
(:mod:`s2d_ext.train.self_data`) and the local nested model family (:mod:`s2d_ext.train.family`). Nothing in
the decoding path imports this package."""
