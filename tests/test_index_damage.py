"""A damaged index on disk: a truncated or overwritten shard is embedded again (and only it), and a
metadata file without its tables gives one line naming the file from `search` and `index info`."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from hemaclip.cache import file_sha1
from hemaclip.data.datasets import load_dataset
from hemaclip.errors import DataError
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.tasks.index import CellIndex

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """12 real cells indexed in 3 shards of 4 by the tiny checkpoint, kept as the clean reference."""
    model, _ = load_checkpoint(tiny_checkpoint)
    records = load_dataset("wbcatt", data_root=data_root).split("test")[:12]
    clean = CellIndex.build(model, records, tmp_path_factory.mktemp("clean") / "cells.index", checkpoint_id=file_sha1(tiny_checkpoint),
                            shard_size=4, progress=False, checkpoint_path=tiny_checkpoint)
    return model, records, clean, tiny_checkpoint


def _copy(index: CellIndex, tmp_path: Path) -> Path:
    target = tmp_path / "cells.index"
    shutil.copytree(index.path, target)
    return target


DAMAGE = {
    "truncated to half": lambda data: data[: len(data) // 2],
    "truncated to 10 bytes": lambda data: data[:10],
    "last 20 bytes cut": lambda data: data[:-20],
    "empty": lambda data: b"",
    "overwritten with text": lambda data: b"not a shard at all" * 10,
    "one byte flipped in the features": lambda data: data[:200] + bytes([data[200] ^ 0xFF]) + data[201:],
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_shard_is_embedded_again(how: str, setup, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, records, clean, checkpoint = setup
    out = _copy(clean, tmp_path)
    shard = out / "shards" / "shard-00001.npz"
    shard.write_bytes(DAMAGE[how](shard.read_bytes()))
    untouched = {name: (out / "shards" / name).stat().st_mtime_ns for name in ("shard-00000.npz", "shard-00002.npz")}
    with caplog.at_level("WARNING", logger="hemaclip"):
        rebuilt = CellIndex.build(model, records, out, checkpoint_id=file_sha1(checkpoint), shard_size=4, progress=False)
    assert rebuilt.build_counts == {"shards": 3, "reused": 2, "computed": 1}
    assert "shard-00001.npz: damaged shard" in caplog.text
    assert np.allclose(np.asarray(rebuilt.embeddings), np.asarray(clean.embeddings), atol=1e-5)
    assert all((out / "shards" / n).stat().st_mtime_ns == t for n, t in untouched.items())  # reused, not redone


def test_index_build_command_redoes_a_truncated_shard(setup, data_root: Path, tmp_path: Path, main_in_process) -> None:
    """The issue's case through the command: `index build` over a truncated shard (was a 61-line BadZipFile traceback)."""
    model, records, clean, checkpoint = setup
    folder = tmp_path / "cells"
    for record in records:
        (folder / record.label).mkdir(parents=True, exist_ok=True)
        (folder / record.label / Path(record.path).name).symlink_to(Path(record.path).resolve())
    out = tmp_path / "folder.index"
    args = ("index", "build", "--data", str(folder), "--out", str(out), "--checkpoint", str(checkpoint), "--shard-size", "4")
    assert main_in_process(*args)[0] == 0
    shard = out / "shards" / "shard-00002.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "meta.sqlite").unlink()  # as a build killed after its shards
    code, stdout, stderr = main_in_process(*args)
    assert code == 0, stderr
    assert "1 shards embedded, 2 reused" in " ".join(stdout.split())
    assert "damaged shard" in stderr and "Traceback" not in stderr
    assert len(CellIndex.load(out)) == len(records)


@pytest.mark.parametrize("table", ["cells", "meta"])
def test_metadata_without_its_table_is_one_line_naming_the_file(table: str, setup, tmp_path: Path, main_in_process) -> None:
    _, _, clean, checkpoint = setup
    out = _copy(clean, tmp_path)
    con = sqlite3.connect(out / "meta.sqlite")
    con.execute(f"DROP TABLE {table}")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="meta.sqlite: not a hemaclip index metadata file"):
        CellIndex.load(out)
    for args in (("index", "info", str(out)), ("search", "a round nucleus", "--index", str(out), "--checkpoint", str(checkpoint))):
        code, _, stderr = main_in_process(*args)
        lines = stderr.strip().splitlines()
        assert code == 1 and len(lines) == 1, stderr
        assert lines[0].startswith("error: ") and str(out / "meta.sqlite") in lines[0]
        assert (f"no table '{table}'" in lines[0]) if table == "cells" else ("no such table: meta" in lines[0])
