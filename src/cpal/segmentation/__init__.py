"""Segmentation stage: losses on pseudo masks and multi-scale inference (networks live in
`cpal.models`: deeplab_v2, deeplab_v3plus, segmenter)."""
