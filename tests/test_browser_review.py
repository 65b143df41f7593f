"""The review page in a real browser, served by the installed `hemaclip serve --review` in a subprocess:
correct two cells (and one attribute) with the keyboard, reload, and the corrections and counts persist;
kill -9 the server in the middle of a stream of corrections, and nothing it acknowledged is lost."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hemaclip.data.datasets import load_dataset
from hemaclip.tasks.describe import Describer
from hemaclip.tasks.review import REVIEW_STORE, review_folder, write_review_reports

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
ENTRY = Path(sys.executable).with_name("hemaclip")
TIMEOUT = 120  # seconds: the shared test machines can be very busy


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def review_dir(data_root: Path, tmp_path_factory: pytest.TempPathFactory, make_tiny_model) -> Path:
    """A review folder of 12 real PBC test cells described by a tiny model."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    test = load_dataset("wbcatt", data_root=data_root).split("test")
    folder = tmp_path_factory.mktemp("slide")
    for label in ("basophil", "eosinophil", "lymphocyte", "neutrophil"):
        for record in [r for r in test if r.label == label][:3]:
            shutil.copy(record.path, folder / Path(record.path).name)
    out = tmp_path_factory.mktemp("review")
    store = review_folder(Describer(make_tiny_model()), "tiny-sha", [folder], out, progress=False)
    write_review_reports(store, out)
    store.close()
    torch.set_num_threads(before)
    return out


def _start(review: Path, port: int) -> subprocess.Popen:
    """`hemaclip serve --review DIR` as a user runs it (the installed entry point), up and answering."""
    command = [str(ENTRY)] if ENTRY.is_file() else [sys.executable, "-m", "hemaclip.cli"]
    proc = subprocess.Popen([*command, "serve", "--review", str(review), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300  # importing the CLI can take minutes on a saturated machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _page_counts(driver) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    return {row.get_attribute("data-class"): int(row.find_element(By.CSS_SELECTOR, "td.count").text)
            for row in driver.find_elements(By.CSS_SELECTOR, "#counts tbody tr")}


def test_keyboard_corrections_persist_across_reload(review_dir: Path, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    proc = _start(review_dir, port)
    try:
        url = f"http://127.0.0.1:{port}/"
        data = httpx.get(f"{url}api/review", timeout=TIMEOUT).json()
        classes, queue = data["classes"], data["queue"]
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        before = _page_counts(browser)
        assert before == {k: v["count"] for k, v in data["differential"].items()}

        name = browser.find_element(By.ID, "reviewer")
        name.send_keys("Test Reviewer", Keys.ENTER)  # Enter leaves the box; the name is kept for the next visit
        keys = ActionChains(browser)
        targets = []
        for position in (0, 1):  # the first two cells of the queue: a number key sets the class and moves on
            cell = queue[position]
            target = next(c for c in ("monocyte", "lymphocyte") if c != cell["current"]["class"])
            targets.append((cell["id"], cell["current"]["class"], target))
            keys.send_keys(str(classes.index(target) + 1)).perform()
            wait.until(lambda d, i=cell["id"]: f"saved: cell #{i} class" in d.find_element(By.ID, "status").text)
        # An attribute of the third cell: down to the first attribute, then a number key.
        third = queue[2]
        size_values = data["attribute_values"]["cell_size"]
        new_size = next(v for v in size_values if v != third["current"]["cell_size"])
        keys.send_keys(Keys.ARROW_DOWN).send_keys(str(size_values.index(new_size) + 1)).perform()
        wait.until(lambda d: f"saved: cell #{third['id']} cell_size" in d.find_element(By.ID, "status").text)

        expected = dict(before)
        for _, old, new in targets:
            if old in expected:
                expected[old] -= 1
            expected[new] += 1
        assert _page_counts(browser) == expected
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "review-page.png"))

        browser.refresh()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert _page_counts(browser) == expected
        assert browser.find_element(By.ID, "reviewer").get_attribute("value") == "Test Reviewer"
        cards = {int(c.get_attribute("data-id")): c for c in browser.find_elements(By.CSS_SELECTOR, "#queue .cell")}
        for cell_id, _, new in targets:
            assert cards[cell_id].find_element(By.CSS_SELECTOR, ".label").text == new
            assert "reviewed" in cards[cell_id].get_attribute("class")
        made = httpx.get(f"{url}api/review/corrections", timeout=TIMEOUT).json()
        assert [(c["cell_id"], c["new"], c["reviewer"]) for c in made] == [
            *((i, new, "Test Reviewer") for i, _, new in targets), (third["id"], new_size, "Test Reviewer")]
    finally:
        _stop(proc)


@pytest.mark.slow
def test_kill_9_mid_correction_loses_nothing_acknowledged(review_dir: Path, tmp_path: Path) -> None:
    review = tmp_path / "review"
    shutil.copytree(review_dir, review)
    port = _free_port()
    proc = _start(review, port)
    url = f"http://127.0.0.1:{port}"
    data = httpx.get(f"{url}/api/review", timeout=TIMEOUT).json()
    ids, classes = [c["id"] for c in data["queue"]], data["classes"]
    acknowledged: list[dict] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=TIMEOUT) as client:
            k = 0
            while not stop.is_set():
                body = {"field": "class", "value": classes[k % len(classes)], "reviewer": "stream"}
                try:
                    response = client.post(f"{url}/api/review/cells/{ids[k % len(ids)]}/corrections", json=body)
                except httpx.HTTPError:
                    return  # the server is gone
                if response.status_code == 200:
                    acknowledged.append(response.json()["correction"])
                k += 1

    writer = threading.Thread(target=stream)
    writer.start()
    deadline = time.monotonic() + 300
    while len(acknowledged) < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # while corrections keep arriving
    proc.wait()
    stop.set()
    writer.join(timeout=30)
    assert len(acknowledged) >= 25

    db = sqlite3.connect(review / REVIEW_STORE)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    saved = {row[0]: row[1:] for row in db.execute("SELECT id, cell_id, new, reviewer FROM corrections")}
    db.close()
    for made in acknowledged:
        assert saved[made["id"]] == (made["cell_id"], made["new"], "stream")

    proc = _start(review, port)  # and the restarted server shows them, counts included
    try:
        assert len(httpx.get(f"{url}/api/review/corrections", timeout=TIMEOUT).json()) == len(saved)
        after = httpx.get(f"{url}/api/review", timeout=TIMEOUT).json()
        latest: dict[int, str] = {}
        for cell_id, new, _ in (saved[k] for k in sorted(saved)):
            latest[cell_id] = new
        currents = {c["id"]: c["current"]["class"] for c in after["queue"]}
        assert all(currents[i] == v for i, v in latest.items())
        counts = {k: v["count"] for k, v in after["differential"].items()}
        assert counts == {k: sum(1 for v in currents.values() if v == k) for k in counts}
    finally:
        _stop(proc)


def test_review_off_loopback_needs_a_token_and_every_request_carries_it(review_dir: Path, run_cli, assert_one_line_error) -> None:
    result = run_cli("serve", "--review", str(review_dir), "--host", "0.0.0.0", "--port", str(_free_port()))
    assert_one_line_error(result, "give --token")
    from fastapi.testclient import TestClient

    from hemaclip.serve.review import create_review_app

    client = TestClient(create_review_app(review_dir, token="s3cret-token-0123456789"), base_url="http://127.0.0.1")
    assert client.get("/api/review").status_code == 401
    assert client.get("/api/review", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/review", headers={"Authorization": "Bearer s3cret-token-0123456789"}).status_code == 200
    assert client.get("/?token=s3cret-token-0123456789").status_code == 200
    assert client.get("/api/review/cells/1/image?token=s3cret-token-0123456789").headers["content-type"] == "image/jpeg"
    assert client.get("/api/review/cells/..%2F..%2Fetc%2Fpasswd/image?token=s3cret-token-0123456789").status_code in (404, 422)


def test_review_server_checks_the_host_and_refuses_out_of_range_cell_ids(review_dir: Path) -> None:
    """Through the installed entry point on 127.0.0.1: a rebinding page's Host gets 400 and stores nothing; a
    cell id beyond SQLite's integer range gets a 4xx JSON answer, not a 500."""
    port = _free_port()
    proc = _start(review_dir, port)
    try:
        url = f"http://127.0.0.1:{port}"
        before = len(httpx.get(f"{url}/api/review/corrections", timeout=TIMEOUT).json())
        cell = httpx.get(f"{url}/api/review", timeout=TIMEOUT).json()["queue"][0]["id"]
        body = {"field": "class", "value": "monocyte", "reviewer": "Mallory"}
        rebound = httpx.post(f"{url}/api/review/cells/{cell}/corrections", json=body, headers={"Host": "attacker.example"}, timeout=TIMEOUT)
        assert rebound.status_code == 400
        assert httpx.get(f"{url}/api/review", headers={"Host": f"attacker.example:{port}"}, timeout=TIMEOUT).status_code == 400
        for huge in (2**63, 10**30, -1):
            for answer in (httpx.post(f"{url}/api/review/cells/{huge}/corrections", json=body, timeout=TIMEOUT),
                           httpx.get(f"{url}/api/review/cells/{huge}/image", timeout=TIMEOUT)):
                assert 400 <= answer.status_code < 500, (huge, answer.status_code, answer.text)
                assert "detail" in answer.json()
        assert len(httpx.get(f"{url}/api/review/corrections", timeout=TIMEOUT).json()) == before
    finally:
        _stop(proc)
    err = proc.stderr.read().decode()
    assert "Traceback" not in err, err
