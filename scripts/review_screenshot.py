"""The committed screenshot `reports/review/review-page.png`: the review page of an example review (a copy of it,
so the example stays unreviewed), in headless Chromium, after two class corrections made with the keyboard.

    python scripts/review_screenshot.py runs/review-examples/lisc-test-200-review [--out reports/review/review-page.png]

The two cells corrected are the first two of the queue, given their true class (the LISC folder names), as a
reviewer would.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("review", type=Path)
    parser.add_argument("--out", type=Path, default=Path("reports/review/review-page.png"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="review-shot-")) / "review"
    shutil.copytree(args.review, work)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "hemaclip.cli", "serve", "--review", str(work), "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                data = httpx.get(f"{url}api/review", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1250"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            driver.find_element(By.ID, "reviewer").send_keys("Example Reviewer", Keys.ENTER)
            for cell in data["queue"][:2]:
                truth = cell["name"].split("_")[0]
                key = str(data["classes"].index(truth) + 1) if truth in data["classes"] else "\n"
                ActionChains(driver).send_keys(key).perform()
                wait.until(lambda d, i=cell["id"]: f"saved: cell #{i} class" in d.find_element(By.ID, "status").text)
            driver.refresh()  # what is shown is what the store holds
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            ActionChains(driver).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT).perform()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
