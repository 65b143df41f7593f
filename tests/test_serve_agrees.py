"""The web API and the command line read a cell the same way: `/api/describe` (the upload path: bytes decoded by
the server, cut into views, batched with other requests) and the installed `hemaclip describe --json` (files read
from disk) give the same class, runner-up and probabilities on the same images, with the shipped model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hemaclip.serve.app import ServeSettings, create_app
from hemaclip.tasks.describe import Describer

ENTRY_POINT = Path(sys.executable).with_name("hemaclip")  # the installed console script, as a user runs it
CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
TOLERANCE = 1e-4  # both round probabilities to 4 decimals

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(data_root: Path) -> list[Path]:
    """The first PBC image of each white-cell class."""
    return [sorted((data_root / "PBC_dataset_normal_DIB" / label).glob("*.jpg"))[0] for label in CLASSES]


@pytest.fixture(scope="module")
def cli_records(images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """`hemaclip describe --json --index none` on the images through the installed entry point, by file name."""
    env = {**os.environ, "HEMACLIP_CACHE": str(tmp_path_factory.getbasetemp() / "hemaclip-cache")}
    result = subprocess.run([str(ENTRY_POINT), "describe", "--json", "--index", "none", *map(str, images)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return {Path(r["source"]).name: r for r in records}


@pytest.fixture(scope="module")
def client():
    """The app `hemaclip serve --no-saliency` builds around the shipped model, without a reference index."""
    describer = Describer.from_checkpoint(None, index=None)
    app = create_app(describer, None, settings=ServeSettings(saliency=False))
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as test_client:
        yield test_client


def test_api_describe_agrees_with_the_cli_on_the_same_images(client: TestClient, images: list[Path],
                                                              cli_records: dict[str, dict]) -> None:
    assert sorted(cli_records) == sorted(p.name for p in images)
    for path in images:
        response = client.post("/api/describe", content=path.read_bytes(),
                               headers={"Content-Type": "image/jpeg", "X-Filename": path.name})
        assert response.status_code == 200, response.text
        api, cli = response.json(), cli_records[path.name]
        assert (api["label"], api["runner_up"], api["abstain"]) == (cli["label"], cli["runner_up"], cli["abstain"]), path.name
        assert api["probability"] == pytest.approx(cli["probability"], abs=TOLERANCE), path.name
        assert api["runner_up_probability"] == pytest.approx(cli["runner_up_probability"], abs=TOLERANCE), path.name
        assert api["attributes"].keys() == cli["attributes"].keys()
        for name, reading in api["attributes"].items():
            assert reading["value"] == cli["attributes"][name]["value"], (path.name, name)
            assert reading["probability"] == pytest.approx(cli["attributes"][name]["probability"], abs=TOLERANCE), (path.name, name)
        assert api["sentence"] == cli["sentence"], path.name
