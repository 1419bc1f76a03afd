"""`ctedge audit`: leakage and shortcuts a data set hides.

* near-duplicates within and across splits (perceptual hash, flips included);
* images with coloured annotation marks;
* a shortcut baseline: a classifier on file metadata only (height, width,
  aspect ratio, channels, format, bytes per pixel), trained on the training
  part and scored on the others: the image model's figures must beat it;
* class balance per split, unreadable and too-small images.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ctedge.core.data import HASH_THRESHOLD, DataOptions, Sample, discover
from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.imageio import DEFAULT_MAX_PIXELS, DEFAULT_WINDOW, read_image
from ctedge.core.preprocess import ANNOTATION_MIN_FRACTION, annotation_fraction, letterbox
from ctedge.core.progress import ProgressFn, tracked
from ctedge.training.splits import make_splits

SHORTCUT_AUC = 0.7  # a metadata-only baseline at or above this AUC is a loud shortcut
LEAKAGE_MESSAGE = "leakage: the same image is in more than one split"
MIN_INLIERS = 60  # ORB matches agreeing on one similarity transform, to confirm a match
_ORB = cv2.ORB_create(nfeatures=500)
_MATCHER = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)


def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a gray image (whole image, letterboxed)."""
    small = letterbox(gray.astype(np.float32), 32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def orb_features(gray: np.ndarray, size: int = 256) -> tuple:
    """ORB keypoints and descriptors of the letterboxed image and its mirror."""
    image = np.clip(letterbox(gray.astype(np.float32), size), 0, 255).astype(np.uint8)
    out = []
    for view in (image, np.ascontiguousarray(image[:, ::-1])):
        points, descriptors = _ORB.detectAndCompute(view, None)
        out.append((np.float32([p.pt for p in points]), descriptors))
    return tuple(out)


def inliers(a: tuple, b: tuple) -> int:
    """ORB matches of ``a`` (either view) to ``b`` consistent with one rotation +
    scale + shift: high for copies, crops, resizes and small rotations of one
    image, low for two different CT slices however alike they look."""
    best = 0
    for points, descriptors in a:
        if descriptors is None or b[0][1] is None:
            continue
        matches = _MATCHER.match(descriptors, b[0][1])
        if len(matches) < 4:
            continue
        src = points[[m.queryIdx for m in matches]]
        dst = b[0][0][[m.trainIdx for m in matches]]
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0)
        best = max(best, int(mask.sum()) if mask is not None else 0)
    return best


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between two arrays of uint64 hashes (broadcast)."""
    x = np.bitwise_xor(a, b)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


@dataclass
class FileFacts:
    sample: Sample
    split: str
    hashes: tuple[int, int]  # image, horizontally flipped image
    keypoints: tuple  # ORB (points, descriptors) of the image and of its mirror image
    height: int
    width: int
    channels: int
    bytes_per_pixel: float
    annotated: bool


def file_facts(sample: Sample, split: str, window: tuple[float, float] = DEFAULT_WINDOW,
               keypoints: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> FileFacts:
    """What the audit needs of one file (hashes and keypoints only when asked)."""
    decoded = read_image(sample.path, window, max_pixels)
    gray = decoded.gray
    channels = 1 if decoded.colour is None else 3
    return FileFacts(sample, split, (phash(gray), phash(gray[:, ::-1])),
                     orb_features(gray) if keypoints else (),
                     gray.shape[0], gray.shape[1],
                     channels, sample.path.stat().st_size / gray.size,
                     annotation_fraction(decoded.colour) >= ANNOTATION_MIN_FRACTION)


def near_duplicates(facts: list[FileFacts], threshold: int = HASH_THRESHOLD) -> list[dict]:
    """Pairs whose hashes (or one's mirror image) differ by at most ``threshold``
    bits and whose ORB keypoints agree: CT slices look alike to a 64-bit hash
    alone, so the hash only proposes and the keypoints confirm."""
    plain = np.array([f.hashes[0] for f in facts], dtype=np.uint64)
    mirror = np.array([f.hashes[1] for f in facts], dtype=np.uint64)
    distance = np.minimum(hamming(plain[:, None], plain[None, :]), hamming(plain[:, None], mirror[None, :]))
    pairs = []
    for i, j in zip(*np.nonzero(np.triu(distance <= threshold, k=1))):
        a, b = facts[i], facts[j]
        agreeing = inliers(a.keypoints, b.keypoints)
        if agreeing < MIN_INLIERS:
            continue
        pairs.append({"a": str(a.sample.path), "b": str(b.sample.path), "bits": int(distance[i, j]),
                      "inliers": agreeing,
                      "splits": [a.split, b.split], "cross_split": a.split != b.split,
                      "same_class": a.sample.label == b.sample.label})
    return sorted(pairs, key=lambda p: (not p["cross_split"], p["bits"]))


def metadata_features(facts: list[FileFacts]) -> np.ndarray:
    formats = sorted({f.sample.path.suffix.lower() for f in facts})
    return np.array([[f.height, f.width, f.width / f.height, f.channels, f.bytes_per_pixel,
                      *[f.sample.path.suffix.lower() == fmt for fmt in formats]] for f in facts], float)


def metadata_baseline(splits: dict[str, list[Sample]], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """The shortcut baseline for splits made elsewhere (``ctedge evaluate``); images
    above ``max_pixels`` are left out."""
    facts = []
    for split, samples in splits.items():
        for sample in samples:
            try:
                facts.append(file_facts(sample, split, keypoints=False, max_pixels=max_pixels))
            except UnreadableImage:
                continue
    return shortcut_baseline(facts)


def shortcut_baseline(facts: list[FileFacts]) -> dict:
    """Train a small classifier on metadata of the training part; score the rest."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_curve

    from ctedge.core.metrics import point_metrics

    x, y = metadata_features(facts), np.array([f.sample.label for f in facts])
    splits = np.array([f.split for f in facts])
    train = splits == "train"
    if len(set(y[train])) < 2:
        return {"note": "training part has one class; no baseline"}
    model = RandomForestClassifier(n_estimators=200, min_samples_leaf=3, random_state=0).fit(x[train], y[train])
    report = {"features": ["height", "width", "aspect", "channels", "bytes_per_pixel", "format"]}
    for split in ("val", "test"):
        rows = splits == split
        if rows.any() and len(set(y[rows])) == 2:
            scores = model.predict_proba(x[rows])[:, 1]
            m = point_metrics(y[rows], scores)
            fpr, tpr, _ = roc_curve(y[rows], scores)
            report[split] = {"auc": m["auc"], "accuracy": m["accuracy"], "images": int(rows.sum()),
                             "roc": {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()}}
    return report


def shortcut_is_loud(baseline: dict) -> bool:
    """Whether a split's metadata-only baseline is high enough to shout about."""
    return baseline.get("auc", 0.0) >= SHORTCUT_AUC


def shortcut_finding(split: str, baseline: dict) -> tuple[bool, str]:
    """(loud, the sentence) for one split's metadata-only baseline."""
    loud = shortcut_is_loud(baseline)
    return loud, (("SHORTCUT: " if loud else "")
                  + f"a classifier on file metadata alone (size, channels, format, bytes/pixel) reaches AUC "
                    f"{baseline['auc']:.3f}, accuracy {baseline['accuracy']:.3f} on {split} ({baseline['images']} images)"
                  + (": read any image model's figures against this" if loud else ""))


def audit(options: DataOptions, image_size: int = 300, threshold: int = HASH_THRESHOLD,
          progress: ProgressFn | None = None) -> dict:
    """Everything above for one data folder; ``leakage`` says whether to fail CI.
    ``progress`` hears the images read; one above ``options.max_pixels`` is unreadable."""
    dataset = discover(options.root, options.positive)
    splits = make_splits(dataset, options.split_dir, options.seed, options.test_fraction,
                         options.val_fraction, options.group_regex)
    facts, unreadable = [], []
    window = DEFAULT_WINDOW
    jobs = [(s, split) for split, samples in splits.items() for s in samples]
    for sample, split in tracked(jobs, "hashing images", len(jobs), progress):
        try:
            facts.append(file_facts(sample, split, window, max_pixels=options.max_pixels))
        except UnreadableImage as exc:
            unreadable.append({"path": str(sample.path), "reason": exc.reason})
    if not facts:
        raise CtedgeError(f"no readable images in {options.root}")
    pairs = near_duplicates(facts, threshold)
    cross = [p for p in pairs if p["cross_split"]]
    balance = {split: {"images": len(s), "positive": sum(x.label for x in s)} for split, s in splits.items()}
    return {
        "data": str(options.root), "classes": dataset.class_names, "balance": balance,
        "near_duplicates": pairs, "cross_split_duplicates": len(cross),
        "annotated": [str(f.sample.path) for f in facts if f.annotated],
        "too_small": [str(f.sample.path) for f in facts if min(f.height, f.width) < image_size],
        "unreadable": unreadable, "shortcut_baseline": shortcut_baseline(facts),
        "hash_threshold_bits": threshold, "leakage": bool(cross),
    }
