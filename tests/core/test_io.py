import numpy as np
import pytest
from PIL import Image

from cpal.io import MapRecord, atomic_path, load_maps, save_label_png, save_maps, voc_palette


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # ignore


def test_label_png_round_trip_keeps_indices_and_palette(tmp_path):
    label = np.array([[0, 1, 2], [255, 20, 3]], dtype=np.uint8)
    save_label_png(tmp_path / "a.png", label)
    image = Image.open(tmp_path / "a.png")
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), label)
    assert image.getpalette()[3:6] == [128, 0, 0]


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_maps_round_trip_float16(tmp_path):
    maps = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    save_maps(tmp_path / "m.npz", MapRecord(classes=np.array([3, 9]), maps=maps))
    record = load_maps(tmp_path / "m.npz")
    assert record.classes.tolist() == [3, 9]
    # float16 storage: half an ulp is <= 2.4e-4 on [0, 1] (no kernel involved).
    np.testing.assert_allclose(record.maps, maps, atol=1e-3)
    with pytest.raises(ValueError, match="does not match"):
        MapRecord(classes=np.array([1]), maps=maps)
    assert record.background is None  # CAM maps: no background of their own


def test_maps_background_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    maps, bg = rng.random((2, 5, 7)).astype(np.float32), rng.random((5, 7)).astype(np.float32)
    save_maps(tmp_path / "m.npz", MapRecord(np.array([3, 9]), maps, background=bg))
    # float16 storage, as above.
    np.testing.assert_allclose(load_maps(tmp_path / "m.npz").background, bg, atol=1e-3)
    with pytest.raises(ValueError, match="background shape"):
        MapRecord(np.array([3, 9]), maps, background=bg[:4])


def test_atomic_files_get_default_permissions(tmp_path):
    import os
    import stat

    from cpal.io import write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize(("code", "advice"), [
    (28, "free space and rerun the same command"),  # ENOSPC
    (13, "make {parent} writable or choose another output_dir"),  # EACCES
    (30, "make {parent} writable or choose another output_dir"),  # EROFS
])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, code,
                                                           advice):
    import os

    from cpal.errors import OutputError
    from cpal.io import write_text_atomic

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError) as info:
        write_text_atomic(target, "new")
    message = str(info.value)
    assert message.startswith(f"{target}: cannot write ({os.strerror(code)}); ")
    assert advice.format(parent=tmp_path) in message and "\n" not in message
    monkeypatch.undo()
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_other_os_errors_are_not_disguised(tmp_path, monkeypatch):
    import errno
    import os

    from cpal.io import write_text_atomic

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomic(tmp_path / "x.txt", "new")


def test_damaged_map_files_are_named(tmp_path):
    from cpal.errors import DatasetError
    from cpal.io import map_file_problem

    path = tmp_path / "a.npz"
    save_maps(path, MapRecord(classes=np.array([1]), maps=np.zeros((1, 4, 4), np.float32)))
    assert map_file_problem(path) is None
    whole = path.read_bytes()
    for damaged, problem in ((b"", "empty file"), (whole[: len(whole) // 2], None),
                             (whole[:-30], None)):
        path.write_bytes(damaged)
        found = map_file_problem(path)
        assert found is not None and (problem is None or found == problem)
        with pytest.raises(DatasetError, match=r"a\.npz: damaged map file \(.*rerun `cpal infer`"):
            load_maps(path)


def test_link_tree_links_every_finished_file_and_copies_where_links_fail(tmp_path,
                                                                         monkeypatch):
    import errno
    import os

    from cpal.errors import OutputError
    from cpal.io import link_tree

    source = tmp_path / "a"
    (source / "sub").mkdir(parents=True)
    (source / "w.safetensors").write_bytes(b"weights")
    (source / "w.json").write_text("{}")
    (source / "sub" / "m.npz").write_bytes(b"map")
    (source / ".half.npz.x.tmp").write_bytes(b"torn")  # unfinished writes stay behind
    (source / ".w.safetensors.tmpab12").write_bytes(b"torn")
    assert link_tree(source, tmp_path / "b") == 3
    for name in ("w.safetensors", "w.json", "sub/m.npz"):
        assert (tmp_path / "b" / name).samefile(source / name)
    assert not (tmp_path / "b" / ".half.npz.x.tmp").exists()

    def no_links(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", no_links)
    assert link_tree(source, tmp_path / "c") == 3
    assert (tmp_path / "c" / "sub" / "m.npz").read_bytes() == b"map"
    assert not (tmp_path / "c" / "w.json").samefile(source / "w.json")
    assert sorted(p.name for p in (tmp_path / "c").rglob("*") if p.is_file()) == [
        "m.npz", "w.json", "w.safetensors"]  # no temporary of the copies left behind

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("shutil.copyfile", full)
    with pytest.raises(OutputError) as info:
        link_tree(source, tmp_path / "d")
    assert str(info.value).startswith(f"{tmp_path / 'd' / 'sub' / 'm.npz'}: cannot write (")
    assert not list((tmp_path / "d").rglob("*.npz"))  # nothing torn left behind
