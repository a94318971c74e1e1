"""Sample quality: feature networks (TF-FID Inception-v3, a Fashion-MNIST classifier), FID /
sFID / IS / precision-recall, samples drawn by index, and the ``tools/fid.py`` CLI."""
