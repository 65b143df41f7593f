"""The page in a real browser: headless Chromium (Debian's chromium + chromedriver, never downloaded)
drives a live uvicorn server on a free loopback port with a tiny random model and a 20-image index of
real PBC cells: upload a cell, see class/attributes/sentence, run a text search, keep a screenshot."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from hemaclip.data.datasets import load_dataset
from hemaclip.serve.app import create_app
from hemaclip.tasks.describe import Describer
from hemaclip.tasks.index import CellIndex

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium/chromedriver not installed (run `make browser`, or apt-get install chromium chromium-driver)",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(data_root: Path, tmp_path_factory: pytest.TempPathFactory, make_tiny_model):
    """uvicorn in a background thread, serving a tiny model and an index of 20 real cells."""
    import uvicorn

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; spinning OpenMP threads only slow a busy shared machine
    test = load_dataset("wbcatt", data_root=data_root).split("test")
    cells = [r for label in sorted({r.label for r in test}) for r in [x for x in test if x.label == label][:4]]
    model = make_tiny_model()
    index = CellIndex.build(model, cells, tmp_path_factory.mktemp("browser") / "ref.index", checkpoint_id="tiny", progress=False)
    app = create_app(Describer(model, index=index), index)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", cells
    uv.should_exit = True
    thread.join(timeout=10)
    torch.set_num_threads(before)


def test_upload_describe_and_search_in_the_page(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, cells = server
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "reference cells" in d.find_element(By.ID, "status").text)

    browser.find_element(By.ID, "file-input").send_keys(str(Path(cells[5].path).resolve()))
    wait.until(EC.visibility_of_element_located((By.ID, "result")))
    assert not browser.find_element(By.ID, "describe-error").is_displayed()
    label = browser.find_element(By.ID, "class-label").text
    assert label in {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "erythroblast", "ig", "platelet"}
    assert browser.find_element(By.ID, "class-prob").text.startswith("(p = ")
    assert browser.find_element(By.ID, "sentence").text.strip()
    rows = browser.find_elements(By.CSS_SELECTOR, "#attribute-table tbody tr")
    assert len(rows) == 11
    assert "cell size" in rows[0].text or "cell" in rows[0].text
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours .cell img")) == 5)
    wait.until(lambda d: all(img.get_attribute("naturalWidth") not in (None, "0") for img in d.find_elements(By.CSS_SELECTOR, "#neighbours img")))
    assert browser.find_element(By.ID, "saliency-figure").is_displayed()

    browser.find_element(By.ID, "search-query").send_keys("large cell with a segmented nucleus and coarse red granules")
    k = browser.find_element(By.ID, "search-k")
    k.clear()
    k.send_keys("8")
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results .cell")) == 8)
    wait.until(lambda d: all(img.get_attribute("naturalWidth") not in (None, "0") for img in d.find_elements(By.CSS_SELECTOR, "#search-results img")))
    assert "8 cells for" in browser.find_element(By.ID, "search-summary").text

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "browser-page.png"))
    assert (ARTIFACTS / "browser-page.png").stat().st_size > 10_000

    # A bad filter is reported in the page, not as a broken grid.
    where = browser.find_element(By.ID, "search-where")
    where.send_keys("granule_colour=green")
    browser.find_element(By.ID, "search-button").click()
    wait.until(EC.visibility_of_element_located((By.ID, "search-error")))
    assert "unknown value 'green'" in browser.find_element(By.ID, "search-error").text


def test_the_page_shows_the_unfamiliar_flag_of_a_cell_and_hides_it_for_a_familiar_one(server, browser, data_root, make_tiny_model) -> None:
    """A server whose familiarity score flags an other-lab cell (Zheng, Tecom) but not an in-lab PBC cell: the
    API returns unfamiliar true/false with the score, and the page shows the warning only for the first."""
    import numpy as np
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from hemaclip.data.preprocess import decode_image
    from hemaclip.tasks.familiarity import fit_familiarity

    _, cells = server
    model = make_tiny_model()
    describer = Describer(model, index=None)
    other_lab = data_root / "zheng2018" / "dataset1_tecom" / "images" / "001.png"
    from hemaclip.models.inference import image_outputs

    arrays = np.stack([describer.prepare(decode_image(r.path)) for r in cells])
    features = image_outputs(describer.model, arrays)["features"].numpy()
    fam = fit_familiarity(features, [r.label for r in cells], features, "tiny", "test: the 20 index cells")
    in_lab_scores = fam.score(features)
    outside = float(fam.score(image_outputs(describer.model, describer.prepare(decode_image(other_lab))[None])["features"].numpy())[0])
    familiar = int(np.argmin(in_lab_scores))
    assert outside > in_lab_scores[familiar], "the tiny model must place the other-lab cell further out than its closest PBC cell"
    fam.threshold = (outside + float(in_lab_scores[familiar])) / 2
    describer.familiarity = fam
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(describer, None), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{port}")
        browser.find_element(By.ID, "file-input").send_keys(str(Path(other_lab).resolve()))
        wait.until(EC.visibility_of_element_located((By.ID, "unfamiliar")))
        assert "Unfamiliar image" in browser.find_element(By.ID, "unfamiliar").text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "browser-unfamiliar.png"))
        browser.get(f"http://127.0.0.1:{port}")
        browser.find_element(By.ID, "file-input").send_keys(str(Path(cells[familiar].path).resolve()))
        wait.until(EC.visibility_of_element_located((By.ID, "result")))
        wait.until(lambda d: d.find_element(By.ID, "class-label").text.strip())
        assert not browser.find_element(By.ID, "unfamiliar").is_displayed()
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
