"""Miniature VOC 2012, SBD and COCO 2014 trees in the real file formats, for prepare tests.

VOC: JPEGs, palette SegmentationClass PNGs with a 255 boundary band, Annotations XML (with
difficult objects and <part> names), ImageSets/Segmentation lists. SBD: cls/<id>.mat holding
a MATLAB struct GTcls (Boundaries cell of sparse matrices, uint8 Segmentation,
CategoriesPresent) as scipy writes it, img/, train.txt, val.txt. COCO: instances JSON with
polygons, uncompressed RLE (crowd), compressed RLE, non-contiguous category ids and an image
without annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cpal.io import save_label_png

# ---------------------------------------------------------------------------------- VOC

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000002"]
VOC_VAL = ["2007_000033", "2008_000008"]
SBD_TRAIN = ["2007_000032", "2009_000001", "2007_000033"]  # one VOC train id, one VOC val id
SBD_VAL = ["2009_000002", "2010_000003", "2008_000008"]
SBD_ONLY = ["2009_000001", "2009_000002", "2010_000003"]
TRAIN_AUG = sorted(set(VOC_TRAIN) | set(SBD_ONLY))
EXTRA = "2011_000010"  # an image (and XML) that no list names
VOC_SIZE = (6, 8)  # height, width; 2008_000008 is 5 x 7
OBJECTS = {  # (class, difficult); every id gets an XML
    "2007_000032": [("aeroplane", 0), ("person", 1)],
    "2007_000039": [("tvmonitor", 0)],
    "2008_000002": [("dog", 0), ("dog", 0), ("cat", 1)],
    "2007_000033": [("aeroplane", 0)],
    "2008_000008": [("horse", 0), ("person", 0)],
    "2009_000001": [("bird", 0)],
    "2009_000002": [("car", 0), ("bus", 0)],
    "2010_000003": [("sheep", 1)],
    EXTRA: [("cow", 0)],
}
EXPECTED_LABELS = {
    "2007_000032": ["aeroplane", "person"],
    "2007_000039": ["tvmonitor"],
    "2008_000002": ["cat", "dog"],
    "2007_000033": ["aeroplane"],
    "2008_000008": ["horse", "person"],
    "2009_000001": ["bird"],
    "2009_000002": ["bus", "car"],
    "2010_000003": ["sheep"],
    EXTRA: ["cow"],
}


def _size(image_id: str) -> tuple[int, int]:
    return (5, 7) if image_id == "2008_000008" else VOC_SIZE


def _jpeg(path: Path, height: int, width: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def voc_mask(image_id: str) -> np.ndarray:
    """The VOC SegmentationClass mask of a train/val id: a class block, a 255 boundary ring."""
    height, width = _size(image_id)
    mask = np.zeros((height, width), np.uint8)
    value = 1 + sum(map(ord, image_id)) % 20
    mask[1:4, 2:6] = 255
    mask[2:3, 3:5] = value
    return mask


def sbd_mask(image_id: str) -> np.ndarray:
    """The SBD mask of an id: class indices only, no boundary band (as in SBD)."""
    height, width = _size(image_id)
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 1 + sum(map(ord, image_id)) % 20
    mask[0, -1] = 15
    return mask


def _xml(image_id: str) -> str:
    height, width = _size(image_id)
    objects = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult>"
        + ("<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
           "<ymax>2</ymax></bndbox></part>" if name == "person" else "")
        + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object>"
        for name, difficult in OBJECTS[image_id]
    )
    return (
        f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
        f"<source><database>The VOC2007 Database</database></source>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>1</segmented>{objects}</annotation>"
    )


def make_voc(root: Path) -> Path:
    """A VOC2012 folder as the official tar unpacks (minus SegmentationObject)."""
    for seed, image_id in enumerate(sorted(OBJECTS)):
        _jpeg(root / "JPEGImages" / f"{image_id}.jpg", *_size(image_id), seed)
        annotation = root / "Annotations" / f"{image_id}.xml"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        annotation.write_text(_xml(image_id))
    for image_id in VOC_TRAIN + VOC_VAL:
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", voc_mask(image_id))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in VOC_VAL))
    (lists / "trainval.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN + VOC_VAL))
    return root


def write_sbd_mat(path: Path, segmentation: np.ndarray, dtype: type = np.uint8) -> None:
    """cls/<id>.mat as SBD ships it: struct GTcls {Boundaries, Segmentation, CategoriesPresent}
    (Segmentation is uint8 in the release; `dtype` makes other copies)."""
    from scipy.io import savemat
    from scipy.sparse import csc_matrix

    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = csc_matrix((segmentation == k + 1).astype(np.uint8))
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)])
    gtcls = {
        "Boundaries": boundaries,
        "Segmentation": segmentation.astype(dtype),
        "CategoriesPresent": present.astype(np.uint8).reshape(-1, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"GTcls": gtcls}, do_compression=True)


def make_sbd(folder: Path) -> Path:
    """SBD's benchmark_RELEASE/dataset: cls/, img/, train.txt, val.txt."""
    for seed, image_id in enumerate(sorted(set(SBD_TRAIN) | set(SBD_VAL))):
        write_sbd_mat(folder / "cls" / f"{image_id}.mat", sbd_mask(image_id))
        _jpeg(folder / "img" / f"{image_id}.jpg", *_size(image_id), 100 + seed)
    (folder / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (folder / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    return folder


# --------------------------------------------------------------------------------- COCO

# Non-contiguous ids, listed out of order: indices follow id order.
COCO_CATEGORIES = [
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "indoor", "id": 90, "name": "toothbrush"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
]
COCO_CLASSES = ["background", "person", "car", "dog", "toothbrush"]
TRAIN_A = "COCO_train2014_000000000009"
TRAIN_B = "COCO_train2014_000000000025"
VAL_A = "COCO_val2014_000000000042"
VAL_EMPTY = "COCO_val2014_000000000073"
COCO_SIZES = {TRAIN_A: (10, 12), TRAIN_B: (8, 9), VAL_A: (7, 7), VAL_EMPTY: (6, 6)}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.astype(bool).flatten(order="F")
    counts, current, run = [], False, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def coco_masks() -> dict[str, np.ndarray]:
    """The semantic masks the COCO fixture must render to, computed by hand."""
    a = np.zeros(COCO_SIZES[TRAIN_A], np.uint8)
    a[6:10, :] = 255  # car crowd, rows 6..9
    a[0:8, 0:8] = 1  # person polygon (0,0)-(8,8): wins over the crowd where they overlap
    a[1:4, 1:5] = 3  # dog polygon (1,1)-(5,4), smaller: wins over the person
    b = np.zeros(COCO_SIZES[TRAIN_B], np.uint8)
    b[2:5, 3:9] = 4  # toothbrush, compressed RLE
    b[7, 0:2] = 255  # car crowd (the only car: a crowd-only label)
    v = np.zeros(COCO_SIZES[VAL_A], np.uint8)
    v[1:6, 2:5] = 2  # car polygon (2,1)-(5,6)
    return {TRAIN_A: a, TRAIN_B: b, VAL_A: v}


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def coco_instances(split: str) -> dict:
    """instances_<split>2014.json of the fixture."""
    from pycocotools import mask as mask_api

    ids = {TRAIN_A: 9, TRAIN_B: 25, VAL_A: 42, VAL_EMPTY: 73}
    stems = [TRAIN_A, TRAIN_B] if split == "train" else [VAL_A, VAL_EMPTY]
    images = [
        {"license": 1, "file_name": f"{stem}.jpg", "coco_url": "", "height": COCO_SIZES[stem][0],
         "width": COCO_SIZES[stem][1], "date_captured": "2013-11-14 16:28:13",
         "flickr_url": "", "id": ids[stem]}
        for stem in stems
    ]
    crowd_a = np.zeros(COCO_SIZES[TRAIN_A], np.uint8)
    crowd_a[6:10, :] = 1
    crowd_b = np.zeros(COCO_SIZES[TRAIN_B], np.uint8)
    crowd_b[7, 0:2] = 1
    brush = np.zeros(COCO_SIZES[TRAIN_B], np.uint8)
    brush[2:5, 3:9] = 1
    compressed = mask_api.encode(np.asfortranarray(brush))
    compressed["counts"] = compressed["counts"].decode("ascii")
    annotations = {
        "train": [
            # Annotation order puts the small dog first: the area rule, not order, decides.
            {"id": 101, "image_id": 9, "category_id": 18, "iscrowd": 0,
             "segmentation": [_rect(1, 1, 5, 4)], "area": 12.0, "bbox": [1, 1, 4, 3]},
            {"id": 102, "image_id": 9, "category_id": 1, "iscrowd": 0,
             "segmentation": [_rect(0, 0, 8, 8)], "area": 64.0, "bbox": [0, 0, 8, 8]},
            {"id": 103, "image_id": 9, "category_id": 3, "iscrowd": 1,
             "segmentation": uncompressed_rle(crowd_a), "area": 48.0, "bbox": [0, 6, 12, 4]},
            {"id": 104, "image_id": 25, "category_id": 90, "iscrowd": 0,
             "segmentation": compressed, "area": 18.0, "bbox": [3, 2, 6, 3]},
            {"id": 105, "image_id": 25, "category_id": 3, "iscrowd": 1,
             "segmentation": uncompressed_rle(crowd_b), "area": 2.0, "bbox": [0, 7, 2, 1]},
            # A degenerate two-point polygon: dropped, draws nothing.
            {"id": 106, "image_id": 25, "category_id": 90, "iscrowd": 0,
             "segmentation": [[0, 0, 1, 1]], "area": 0.0, "bbox": [0, 0, 1, 1]},
        ],
        "val": [
            {"id": 201, "image_id": 42, "category_id": 3, "iscrowd": 0,
             "segmentation": [_rect(2, 1, 5, 6)], "area": 15.0, "bbox": [2, 1, 3, 5]},
        ],
    }[split]
    return {
        "info": {"description": "COCO 2014 Dataset (cpal test fixture)", "year": 2014},
        "images": images,
        "licenses": [{"url": "", "id": 1, "name": "test"}],
        "annotations": annotations,
        "categories": COCO_CATEGORIES,
    }


def make_coco(root: Path) -> Path:
    """A COCO2014 folder: train2014/, val2014/, annotations/instances_{train,val}2014.json."""
    for seed, (stem, (height, width)) in enumerate(COCO_SIZES.items()):
        folder = "train2014" if "train" in stem else "val2014"
        _jpeg(root / folder / f"{stem}.jpg", height, width, 200 + seed)
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2014.json"
        path.write_text(json.dumps(coco_instances(split)))
    return root


def make_coco_many(root: Path, count: int) -> Path:
    """A COCO2014 folder with `count` small annotated train images (one val image): enough
    masks for a run to be killed while it renders them."""
    make_coco(root)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    for number in range(count):
        image_id = 1000 + number
        stem = f"COCO_train2014_{image_id:012d}"
        _jpeg(root / "train2014" / f"{stem}.jpg", 24, 32, 300 + number)
        data["images"].append({"file_name": f"{stem}.jpg", "height": 24, "width": 32,
                               "id": image_id})
        x = number % 20
        data["annotations"].append(
            {"id": 10_000 + number, "image_id": image_id, "category_id": 18, "iscrowd": 0,
             "segmentation": [_rect(x, 2, x + 9, 20)], "area": 162.0, "bbox": [x, 2, 9, 18]}
        )
    path.write_text(json.dumps(data))
    return root
