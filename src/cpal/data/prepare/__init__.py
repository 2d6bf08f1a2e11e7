"""Turn downloaded PASCAL VOC 2012 (+SBD) and COCO 2014 into VOC-layout roots, and verify them.

`cpal data prepare voc|coco` writes only new files under the dataset root (lists, labels,
masks, a manifest with counts and checksums); `cpal data verify` re-checks a root against
its manifest. Submodules import scipy / pycocotools lazily, so this package loads without them.
"""
