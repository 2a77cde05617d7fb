"""The search page in a real headless browser (Debian's chromium + chromedriver, driven by
Selenium): type a query, wait for the hits, check the boxes are drawn over the images, click a
hit to search for more like it, and save a screenshot. `.ci/run` installs the browser."""

import os
import shutil
from pathlib import Path

import pytest
from test_search import save_tiny

from tipslab.retrieval.index_dir import build_index
from tipslab.retrieval.service import load_indexes
from tipslab.retrieval.service_app import ServerThread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs the chromium and chromium-driver system packages (.ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_search_draws_boxes_and_more_like_this(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    model = save_tiny(tmp_path / "model")
    build_index(model, "scenes:val:8", tmp_path / "scenes", progress=False)
    with ServerThread(load_indexes([tmp_path / "scenes"])) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#index option")))
        threshold = browser.find_element(By.ID, "threshold")
        threshold.clear()
        threshold.send_keys("0")  # an untrained model: keep the top k whatever they score
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("6")
        browser.find_element(By.ID, "q").send_keys("a red circle\n")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#hits .hit")) == 6)
        wait.until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('#hits .frame img:not(.heat)')].every(i => i.complete && i.naturalWidth > 0)"))
        # Each box lies inside its image, with a real size, where the API put it.
        geometry = browser.execute_script("""
            return [...document.querySelectorAll('#hits .hit')].map(hit => {
              const f = hit.querySelector('.frame img').getBoundingClientRect();
              const b = hit.querySelector('.box').getBoundingClientRect();
              return [f.left, f.top, f.right, f.bottom, b.left, b.top, b.right, b.bottom,
                      getComputedStyle(hit.querySelector('.box')).borderTopColor];
            });""")
        assert len(geometry) == 6
        for fl, ft, fr, fb, bl, bt, br, bb, colour in geometry:
            assert fr - fl > 100 and br - bl >= 8 and bb - bt >= 8
            assert fl - 1 <= bl < br <= fr + 1 and ft - 1 <= bt < bb <= fb + 1
            assert colour == "rgb(0, 255, 64)"
        assert "6 region(s) for “a red circle”" in browser.find_element(By.ID, "status").text

        browser.find_element(By.ID, "heat").click()  # heatmaps shown over every hit
        wait.until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('#hits img.heat')].every(i => i.complete && i.naturalWidth > 0)"
            " && getComputedStyle(document.querySelector('#hits img.heat')).opacity > 0.5"))
        shots = Path(os.environ.get("TIPSLAB_SCREENSHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shots / "serve_page.png"))
        assert (shots / "serve_page.png").stat().st_size > 10_000

        browser.find_elements(By.CSS_SELECTOR, "#hits .hit")[0].click()  # more like this region
        wait.until(lambda b: "region (" in b.find_element(By.ID, "status").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#hits .hit .box")) == 6

        browser.find_element(By.ID, "q").clear()
        browser.find_element(By.ID, "q").send_keys(" \n")
        wait.until(lambda b: "expected non-empty text" in b.find_element(By.ID, "status").text)
