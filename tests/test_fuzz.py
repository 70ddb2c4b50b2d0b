"""Property-based (hypothesis) tests of the point JSON loader and of build_targets.

Bounded example counts (deadline off) keep the file well under a minute on one CPU core.
"""
import json
import math
import os
import tempfile

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2seg.data.point_coco import load_point_coco_json
from p2seg.data.targets import build_targets, point_pixels

IGNORE = 255
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------ loader


@st.composite
def valid_point_json(draw):
    """A valid point JSON (dict) and the expected number of points per image id."""
    cat_ids = draw(st.lists(st.integers(1, 1000), min_size=1, max_size=4, unique=True))
    image_ids = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=4, unique=True))
    images, annotations, expected = [], [], {}
    for image_id in image_ids:
        h, w = draw(st.integers(8, 64)), draw(st.integers(8, 64))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": h, "width": w})
        expected[image_id] = 0
        for _ in range(draw(st.integers(0, 4))):
            crowd = draw(st.integers(0, 5)) == 0
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": draw(st.sampled_from(cat_ids)),
                   "iscrowd": int(crowd)}
            if not crowd:
                x = draw(st.one_of(st.sampled_from([0, w, 0.0, float(w)]), st.floats(0, w)))
                y = draw(st.one_of(st.sampled_from([0, h]), st.floats(0, h)))
                ann["point"] = [x, y]
                expected[image_id] += 1
            if draw(st.booleans()):
                ann["bbox"] = [draw(st.floats(0, w)), draw(st.floats(0, h)), draw(st.floats(0, w)), 1]
            if draw(st.booleans()):
                ann["segmentation"] = [[1, 1, w - 1, 1, w - 1, h - 1]]
            annotations.append(ann)
    if sum(expected.values()) == 0:  # a training set needs at least one point
        image = images[0]
        annotations.append({"id": 999999, "image_id": image["id"], "category_id": cat_ids[0],
                            "point": [image["width"] / 2, image["height"] / 2]})
        expected[image["id"]] = 1
    cats = [{"id": c, "name": f"c{c}"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": cats}, expected


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_point_json(draw):
    """A valid point JSON with one random field (or entry) replaced by a random JSON value or removed."""
    data, _ = draw(valid_point_json())
    section = draw(st.sampled_from(["top", "images", "annotations", "categories"]))
    if section == "top":
        parent, key = data, draw(st.sampled_from(["images", "annotations", "categories"]))
    else:
        entries = data[section]
        index = draw(st.integers(0, len(entries) - 1)) if entries else None
        if index is None or draw(st.integers(0, 4)) == 0:  # replace or append a whole entry
            parent, key = entries, index if index is not None else len(entries)
            if key == len(entries):
                entries.append(None)
        else:
            parent = entries[index]
            fields = {"images": ["id", "file_name", "height", "width"],
                      "annotations": ["id", "image_id", "category_id", "iscrowd", "point", "bbox", "segmentation"],
                      "categories": ["id", "name"]}[section]
            key = draw(st.sampled_from(fields))
    if isinstance(parent, dict) and draw(st.integers(0, 3)) == 0:
        parent.pop(key, None)
    else:
        parent[key] = draw(JSON_VALUES)
    return data


def _write(data_or_text):
    """Write to a fresh temporary folder; returns (folder object, json path, image root)."""
    tmp = tempfile.TemporaryDirectory()
    path = os.path.join(tmp.name, "points.json")
    with open(path, "w") as f:
        f.write(data_or_text if isinstance(data_or_text, str) else json.dumps(data_or_text))
    return tmp, path, tmp.name


def _check_loaded(dicts, num_categories):
    """Contract of loaded dicts: unique image ids, finite points inside their image, contiguous classes."""
    assert len({d["image_id"] for d in dicts}) == len(dicts)
    for d in dicts:
        for a in d["annotations"]:
            x, y = a["point"]
            assert math.isfinite(x) and math.isfinite(y)
            assert 0 <= x <= d["width"] and 0 <= y <= d["height"]
            assert 0 <= a["category_id"] < num_categories and a["iscrowd"] == 0


@FUZZ
@given(valid_point_json())
def test_fuzz_valid_point_json_loads_every_point(case):
    data, expected = case
    tmp, path, root = _write(data)
    with tmp:
        dicts = load_point_coco_json(path, root)
    assert {d["image_id"]: len(d["annotations"]) for d in dicts} == expected
    assert [d["image_id"] for d in dicts] == sorted(expected)
    _check_loaded(dicts, len(data["categories"]))
    id_map = {c: k for k, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    points = {a["id"]: (id_map[a["category_id"]], a["point"]) for a in data["annotations"] if "point" in a}
    for d in dicts:
        for a in d["annotations"]:
            assert (a["category_id"], a["point"]) == (points[a["id"]][0], [float(v) for v in points[a["id"]][1]])


def _load_or_clean_error(text_or_data):
    """Load; an error must be a ValueError / KeyError naming the JSON file. Returns dicts or None."""
    tmp, path, root = _write(text_or_data)
    with tmp:
        try:
            return load_point_coco_json(path, root), path
        except (ValueError, KeyError) as e:  # anything else (TypeError, IndexError ...) fails the test
            assert path in str(e), f"error does not name the file: {type(e).__name__}: {e}"
            return None, path


@FUZZ
@given(mutated_point_json())
def test_fuzz_mutated_point_json_loads_or_raises_naming_the_file(data):
    dicts, _ = _load_or_clean_error(data)
    if dicts is not None:
        _check_loaded(dicts, len(data["categories"]))


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.text(max_size=40), JSON_VALUES.map(json.dumps)))
def test_fuzz_arbitrary_text_raises_naming_the_file(text):
    dicts, _ = _load_or_clean_error(text)
    assert dicts is None  # no random text is a valid point JSON with images and points


# ------------------------------------------------------------------------------------ targets


@st.composite
def target_case(draw):
    """Random semantic map (blocky classes, ignore pixels), points (foreground / border / anywhere)."""
    h, w = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    num_classes = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cells = draw(st.integers(1, 6))
    coarse = rng.integers(0, num_classes + 1, (cells, cells)).astype(np.uint8)
    sem = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
    sem[rng.random((h, w)) < draw(st.floats(0, 0.3))] = IGNORE
    noise = rng.random((h, w)) < draw(st.floats(0, 0.1))
    sem[noise] = rng.integers(0, num_classes + 1, int(noise.sum()))
    points, classes = [], []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["foreground", "border", "anywhere"]))
        if kind == "foreground" and ((sem > 0) & (sem <= num_classes)).any():
            ys, xs = np.nonzero((sem > 0) & (sem <= num_classes))
            i = draw(st.integers(0, len(ys) - 1))
            x, y = xs[i] + draw(st.floats(-0.49, 0.49)), ys[i] + draw(st.floats(-0.49, 0.49))
            k = int(sem[ys[i], xs[i]]) - 1 if draw(st.integers(0, 4)) else draw(st.integers(0, num_classes - 1))
        else:
            if kind == "border":
                x = draw(st.sampled_from([0.0, -0.5, w - 1.0, w - 0.5, float(w)]))
                y = draw(st.one_of(st.sampled_from([0.0, -0.5, h - 1.0, h - 0.5, float(h)]), st.floats(0, h - 1)))
            else:
                x, y = draw(st.floats(-0.5, w - 0.5)), draw(st.floats(-0.5, h - 0.5))
            k = draw(st.integers(0, num_classes - 1))
        points.append([x, y])
        classes.append(k)
    return {
        "sem_seg": sem,
        "points": np.array(points, np.float64).reshape(-1, 2),
        "point_classes": np.array(classes, np.int64),
        "num_classes": num_classes,
        "sigma": draw(st.floats(0.3, 8.0)),
        "min_component_area": draw(st.integers(1, 40)),
        "connectivity": draw(st.sampled_from([4, 8])),
    }


def _expected_assigned(sem, pix, classes, min_area, connectivity):
    """Oracle: pixels of the components (area >= min_area) of class k holding a class-k point pixel,
    and for each point the component label it sits in (-1 if none), per class."""
    expected = np.zeros(sem.shape, bool)
    comp_of_point = np.full(len(pix), -1)
    labels_of_class = {}
    for k in np.unique(classes):
        mask = (sem == k + 1).astype(np.uint8)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=connectivity)
        labels_of_class[int(k)] = labels
        for i in np.flatnonzero(classes == k):
            c = labels[pix[i, 1], pix[i, 0]]
            if c > 0 and stats[c, cv2.CC_STAT_AREA] >= min_area:
                comp_of_point[i] = c
                expected |= labels == c
    return expected, comp_of_point, labels_of_class


@FUZZ
@given(target_case())
def test_fuzz_build_targets_invariants(case):
    sem, points, classes, num_classes = case["sem_seg"], case["points"], case["point_classes"], case["num_classes"]
    h, w = sem.shape
    t = build_targets(sem, points, classes, num_classes, sigma=case["sigma"],
                      min_component_area=case["min_component_area"], connectivity=case["connectivity"],
                      ignore_value=IGNORE)
    center, cw, off, ow = t["center"], t["center_weights"], t["offset"], t["offset_weights"]
    assert center.shape == (num_classes, h, w) and off.shape == (2, h, w) and cw.shape == ow.shape == (h, w)
    assert all(a.dtype == np.float32 for a in t.values())
    pix = point_pixels(points, h, w)

    # centre heatmaps: in [0, 1], exactly 1 at each point pixel of its class, 0 in classes without points
    assert center.min() >= 0 and center.max() <= 1
    assert (center[classes, pix[:, 1], pix[:, 0]] == 1).all()
    assert not center[np.setdiff1d(np.arange(num_classes), classes)].any()
    # centre weights: 0 exactly on ignore pixels
    np.testing.assert_array_equal(cw, (sem != IGNORE).astype(np.float32))

    # offset weights: binary, only on pseudo-label foreground, offsets zero elsewhere
    assert set(np.unique(ow).tolist()) <= {0.0, 1.0}
    assert ((sem[ow > 0] >= 1) & (sem[ow > 0] <= num_classes)).all()
    assert not off[:, ow == 0].any()
    # ... exactly on the components holding a point of their class (independent oracle)
    expected, comp_of_point, labels_of_class = _expected_assigned(
        sem, pix, classes, case["min_component_area"], case["connectivity"])
    np.testing.assert_array_equal(ow > 0, expected)

    # every weighted offset lands exactly on a point pixel of the pixel's class, in its component,
    # and that point is a nearest one among the component's points
    ys, xs = np.nonzero(ow)
    if len(ys) == 0:
        return
    ty, tx = ys + off[0, ys, xs], xs + off[1, ys, xs]
    assert (ty == np.round(ty)).all() and (tx == np.round(tx)).all()
    label = sem[ys, xs].astype(np.int64)
    comp = np.zeros(len(ys), np.int64)
    for k, labels in labels_of_class.items():
        on_k = label == k + 1
        comp[on_k] = labels[ys[on_k], xs[on_k]]
    candidate = (classes[None, :] + 1 == label[:, None]) & (comp_of_point[None, :] == comp[:, None])
    hit = candidate & (pix[None, :, 1] == ty[:, None]) & (pix[None, :, 0] == tx[:, None])
    assert hit.any(1).all(), "an offset does not land on a same-class point pixel of its component"
    d2 = (pix[None, :, 1] - ys[:, None]) ** 2 + (pix[None, :, 0] - xs[:, None]) ** 2
    nearest = np.where(candidate, d2, np.iinfo(np.int64).max).min(1)
    np.testing.assert_array_equal((ty - ys) ** 2 + (tx - xs) ** 2, nearest)
