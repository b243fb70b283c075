"""GEFF output (write_geff / read_geff, SegmentationResult.to_geff, `segment --format geff`, the napari
writer) and `napari-sam2 convert` between CTC, GEFF and OME-Zarr + tracks CSV, with bad inputs.

The "result" is the synthetic ground truth (a division: label 2 -> 4, 5 on frame 3), so no network
runs; the CLI run uses the ground-truth test double of tests/fakes.py instead of a model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from fakes import GroundTruthPredictor

from napari_sam2.api import SegmentationResult
from napari_sam2.cli import main
from napari_sam2.convert import ConvertError, convert
from napari_sam2.io import read_ctc_tracks, write_ctc
from napari_sam2.io.geff_io import GeffError, read_geff, write_geff
from napari_sam2.synthetic import make_timelapse
from napari_sam2.tracking import add_parents, tracks_table


@pytest.fixture(scope="module")
def ts():
    ts = make_timelapse(n_frames=6, shape=(48, 48), n_cells=3, seed=2)
    assert ts.divisions == [(2, (4, 5), 3)]
    return ts


def _result(ts) -> SegmentationResult:
    """The ground truth as segment_stack would return it (object-present logits +8 where present)."""
    labels = ts.labels.astype(np.uint32)
    present = {lab: (labels == lab).any(axis=(1, 2)) for lab, *_ in ts.lineage}
    scores = {lab: np.where(p, 8.0, np.nan) for lab, p in present.items()}
    parents = {lab: p for lab, _, _, p in ts.lineage if p}
    return SegmentationResult(labels=labels, scores=scores, tracks=add_parents(tracks_table(labels, scores), parents),
                              obj_ids=sorted(scores), parents=parents)


def _division_edges(graph) -> list[tuple]:
    lab, t = graph.nodes["label"], graph.nodes["t"]
    return sorted((lab[u], lab[v], t[u], t[v]) for u, v in graph.edges if lab[u] != lab[v])


def _same_graph(a, b, scores: bool = True) -> None:
    nodes_a = a.nodes if scores else a.nodes.drop(columns="score", errors="ignore")
    pd.testing.assert_frame_equal(nodes_a, b.nodes if scores else b.nodes.drop(columns="score", errors="ignore"))
    np.testing.assert_array_equal(a.edges, b.edges)
    assert a.lineage == b.lineage


def test_geff_holds_nodes_links_divisions_and_names_its_labels(ts, tmp_path):
    from geff import validate_structure
    from traccuracy.loaders import load_geff_data

    out = _result(ts).to_geff(tmp_path / "r.geff")
    graph = read_geff(out)
    present = {(int(lab), t) for t in range(6) for lab in np.unique(ts.labels[t]) if lab}
    assert len(graph.nodes) == len(present) and set(zip(graph.nodes["label"], graph.nodes["t"])) == present
    assert list(graph.nodes.columns) == ["t", "label", "y", "x", "area", "seg_id", "score"]
    assert (graph.nodes["seg_id"] == graph.nodes["label"]).all() and (graph.nodes["score"] == 8).all()
    first = graph.nodes.iloc[0]
    ys, xs = np.nonzero(ts.labels[int(first["t"])] == int(first["label"]))
    assert (first["y"], first["x"], first["area"]) == pytest.approx((ys.mean(), xs.mean(), ys.size))
    # links join each label's consecutive nodes; divisions join the mother's last node to each daughter's first
    assert _division_edges(graph) == [(2, 4, 2, 3), (2, 5, 2, 3)]
    n_links = sum(len(g) - 1 for _, g in graph.nodes.groupby("label"))
    assert len(graph.edges) == n_links + 2 and sorted(graph.lineage) == sorted(ts.lineage)
    # the labels beside it, named in the metadata; geff and traccuracy read the file
    assert graph.labels_path == tmp_path / "r.ome.zarr" / "0"
    np.testing.assert_array_equal(zarr.open_array(str(graph.labels_path), mode="r")[:], ts.labels)
    related = graph.metadata.related_objects[0]
    assert (related.type, related.path, related.node_prop) == ("labels", "../r.ome.zarr/0", "seg_id")
    assert graph.metadata.track_node_props == {"tracklet": "label"} and graph.metadata.directed
    validate_structure(str(out))
    loaded = load_geff_data(str(out), seg_path=str(graph.labels_path), seg_property="seg_id")
    assert loaded.graph.number_of_nodes() == len(present) and loaded.graph.number_of_edges() == len(graph.edges)


def test_round_trips_give_the_same_graph_and_labels(ts, tmp_path):
    result = _result(ts)
    direct = read_geff(result.to_geff(tmp_path / "r.geff", scale=(5.0, 0.5, 0.5),
                                      units={"T": "minute", "Y": "micrometer", "X": "micrometer"}))
    assert direct.scale == (5.0, 0.5, 0.5) and direct.units == {"T": "minute", "Y": "micrometer", "X": "micrometer"}
    # CTC -> GEFF -> CTC: the same masks and res_track.txt; the graph that of the result (CTC holds no scores)
    ctc = result.to_ctc(tmp_path / "a_RES")
    done = convert(ctc, tmp_path / "b.geff")
    assert done["from"] == "ctc" and done["to"] == "geff" and done["divisions"] == 1 and done["objects"] == 6
    _same_graph(read_geff(tmp_path / "b.geff"), direct, scores=False)
    assert "score" not in read_geff(tmp_path / "b.geff").nodes.columns
    convert(tmp_path / "b.geff", tmp_path / "c_RES")
    assert read_ctc_tracks(ctc / "res_track.txt") == read_ctc_tracks(tmp_path / "c_RES" / "res_track.txt")
    for t in range(6):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "c_RES" / f"mask{t:03d}.tif"), ts.labels[t])
    # GEFF -> OME-Zarr + tracks CSV -> GEFF: the same graph, scores and scale included
    convert(tmp_path / "r.geff", tmp_path / "d.ome.zarr")
    csv = pd.read_csv(tmp_path / "d.tracks.csv")
    assert list(csv.columns) == list(result.tracks.columns) and set(csv["parent"]) == {0, 2}
    store = zarr.open_group(str(tmp_path / "d.ome.zarr"), mode="r")
    assert store.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [5.0, 0.5, 0.5]
    convert(tmp_path / "d.ome.zarr", tmp_path / "e.geff")
    back = read_geff(tmp_path / "e.geff")
    _same_graph(back, direct)
    assert back.scale == direct.scale and back.units == direct.units
    np.testing.assert_array_equal(zarr.open_array(str(back.labels_path), mode="r")[:], ts.labels)


def test_segment_format_geff_and_convert_from_the_command_line(tmp_path, monkeypatch, capsys):
    ts = make_timelapse(n_frames=8, shape=(64, 72), n_cells=4, seed=1)  # cell 3 divides into 5, 6 on frame 2
    fake = GroundTruthPredictor(ts.labels, lineage=ts.lineage)
    monkeypatch.setattr("napari_sam2.predictor.video.build_video_predictor", lambda *a, **k: fake)
    (tmp_path / "data").mkdir()
    movie = tmp_path / "data" / "movie.tif"
    tifffile.imwrite(movie, ts.image, photometric="minisblack")
    ts.clicks(0).to_csv(tmp_path / "clicks.csv", index=False)
    out = tmp_path / "out"
    args = ["segment", str(movie), "--out", str(out), "--prompts", str(tmp_path / "clicks.csv"), "--format", "geff",
            "--detect-divisions", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["movie.geff", "movie.manifest.json", "movie.ome.zarr",
                                                     "movie.tracks.csv", "summary.csv"]
    graph = read_geff(out / "movie.geff")
    assert graph.labels_path == out / "movie.ome.zarr" / "0"  # the published name, not the working folder's
    assert len(graph.parents) == 2 and set(graph.parents.values()) == {3}
    assert len(_division_edges(graph)) == 2
    manifest = json.loads((out / "movie.manifest.json").read_text())
    assert manifest["files"]["geff"]["path"] == "movie.geff"
    assert pd.read_csv(out / "summary.csv")["output"].iloc[-1] == str(out / "movie.geff")
    assert main([*args, "--skip-existing"]) == 0 and pd.read_csv(out / "summary.csv")["status"].iloc[-1] == "skipped"
    capsys.readouterr()
    # convert the result to a CTC folder; again only with --overwrite
    res = tmp_path / "movie_RES"
    assert main(["convert", str(out / "movie.geff"), str(res)]) == 0
    assert "(geff) ->" in capsys.readouterr().out
    assert sorted(p for *_, p in read_ctc_tracks(res / "res_track.txt") if p) == [3, 3]
    assert main(["convert", str(out / "movie.geff"), str(res)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(out / "movie.geff"), str(res), "--overwrite"]) == 0


def test_napari_writer_and_label_formats_write_geff(ts, tmp_path):
    from napari_sam2._writer import write_geff_graph
    from napari_sam2.label_formats import format_of_path, write_labels

    written = write_geff_graph(str(tmp_path / "layer.geff"), ts.labels, {"scale": (1.0, 0.25, 0.25)})
    assert written == [str(tmp_path / "layer.geff"), str(tmp_path / "layer.ome.zarr")]
    assert read_geff(written[0]).scale == (1.0, 0.25, 0.25) and read_geff(written[0]).parents == {}
    assert format_of_path("x.geff") == "geff"
    write_labels(tmp_path / "export.geff", ts.labels, tracks=ts.lineage)
    assert sorted(read_geff(tmp_path / "export.geff").lineage) == sorted(ts.lineage)


# ------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def good(ts, tmp_path):
    return _result(ts).to_geff(tmp_path / "good.geff")


def _edit_metadata(path, change) -> None:
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["geff"])
    change(meta)
    group.attrs["geff"] = meta


@pytest.mark.parametrize("version", ["2.0", "0.4.1"])
def test_geff_of_another_spec_version(good, version, tmp_path, capsys):
    _edit_metadata(good, lambda m: m.update(geff_version=version))
    with pytest.raises(GeffError, match=rf"'{good}' is a GEFF of spec version {version}; napari-sam2 reads spec 1\.0"):
        read_geff(good)
    assert main(["convert", str(good), str(tmp_path / "x_RES")]) == 1
    assert f"spec version {version}" in capsys.readouterr().err and not (tmp_path / "x_RES").exists()


@pytest.mark.parametrize("prop", ["t", "label"])
def test_geff_without_a_required_property(good, prop):
    shutil.rmtree(good / "nodes" / "props" / prop)
    _edit_metadata(good, lambda m: m["node_props_metadata"].pop(prop))
    with pytest.raises(GeffError, match=rf"'{good}': the nodes have no property '{prop}' \(they have: .*\); "
                                        "napari-sam2 needs 't' \\(frame\\) and 'label'"):
        read_geff(good)


def _add_edge(path, u: int, v: int) -> None:
    edges = zarr.open_array(str(path / "edges" / "ids"), mode="r+")
    n = edges.shape[0]
    edges.resize((n + 1, 2))
    edges[n] = [u, v]


def _node(graph, label: int, t: int) -> int:
    nodes = graph.nodes
    return int(nodes.index[(nodes["label"] == label) & (nodes["t"] == t)][0])


def test_geff_lineage_whose_parent_starts_after_its_child(good):
    graph = read_geff(good)
    # a "division" edge from label 5 (frames 3..5) into label 3 (frames 0..5)
    _add_edge(good, _node(graph, 5, 3), _node(graph, 3, 4))
    with pytest.raises(GeffError, match=rf"'{good}': label 3 begins at frame 0 but its parent 5 ends at frame 5: a "
                                        "parent must end before its daughters begin"):
        read_geff(good)


def test_geff_edge_back_in_time(good):
    graph = read_geff(good)
    _add_edge(good, _node(graph, 2, 2), _node(graph, 1, 0))
    with pytest.raises(GeffError, match=rf"'{good}': edge \d+ -> \d+ runs from frame 2 \(label 2\) to frame 0 "
                                        r"\(label 1\); edges must run forward in time"):
        read_geff(good)


def test_ctc_and_csv_lineage_whose_parent_starts_after_its_child(ts, tmp_path):
    bad = [(lab, b, e, 4 if lab == 1 else p) for lab, b, e, p in ts.lineage]  # 4 begins at frame 3, 1 at 0
    folder = write_ctc(tmp_path / "a_RES", ts.labels)
    (folder / "res_track.txt").write_text("".join(f"{lab} {b} {e} {p}\n" for lab, b, e, p in bad))
    with pytest.raises(ConvertError, match=rf"'{folder / 'res_track.txt'}': label 1 begins at frame 0 but its parent 4 "
                                           "ends at frame 5"):
        convert(folder, tmp_path / "x.geff")
    assert not (tmp_path / "x.geff").exists() and not (tmp_path / "x.ome.zarr").exists()
    _result(ts).to_geff(tmp_path / "r.geff")
    convert(tmp_path / "r.geff", tmp_path / "d.ome.zarr")
    csv = tmp_path / "d.tracks.csv"
    table = pd.read_csv(csv)
    table.loc[table["label"] == 1, "parent"] = 4
    table.to_csv(csv, index=False)
    with pytest.raises(ConvertError, match=rf"'{csv}': label 1 begins at frame 0 but its parent 4 ends at frame 5"):
        convert(tmp_path / "d.ome.zarr", tmp_path / "y_RES")
    with pytest.raises(ValueError, match="the tracks table: label 1 begins at frame 0 but its parent 4"):
        write_geff(tmp_path / "z.geff", ts.labels, table)
    assert not (tmp_path / "z.geff").exists() and not (tmp_path / "z.ome.zarr").exists()


def test_convert_refuses_outputs_over_inputs_and_unclear_names(ts, tmp_path):
    _result(ts).to_geff(tmp_path / "r.geff")
    with pytest.raises(ConvertError, match="the output '.*r.ome.zarr' would overwrite the input"):
        convert(tmp_path / "r.geff", tmp_path / "r.ome.zarr", overwrite=True)
    with pytest.raises(ConvertError, match="cannot tell the format of OUT '.*out.tif'"):
        convert(tmp_path / "r.geff", tmp_path / "out.tif")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="is not an earlier result of this kind"):
        convert(tmp_path / "r.geff", tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "missing.geff", tmp_path / "x_RES")
    # labels that no longer hold what the graph says
    labels = zarr.open_array(str(tmp_path / "r.ome.zarr" / "0"), mode="r+")
    labels[5] = np.where(labels[5] == 1, 0, labels[5])
    with pytest.raises(ConvertError, match=r"'.*r.geff': label 1 is listed on frames 0..5 but the labels hold it on "
                                           r"frames 0..4"):
        convert(tmp_path / "r.geff", tmp_path / "x_RES")
