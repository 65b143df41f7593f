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
