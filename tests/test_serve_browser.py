"""The search page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, through selenium) against `hade_jax.serve`'s app on a free loopback port,
over an index of 20 real ESC-50 clips. Types a query, waits for the results, finds the clip
the model ranks first, plays an <audio> element, checks that `/audio/../../etc/passwd` is a
404, and saves the screenshot the README shows (docs/images/serve.png)."""

import http.client
import pathlib
import shutil
import socket
import threading
import time

import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from hade_jax import serve

SCREENSHOT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "images" / "serve.png"
QUERY = "a dog barks"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_folder):
  """(base url, model, index): the app `hade_jax.serve` builds, served by uvicorn."""
  model, index = served_folder
  app, engine = serve.build_app(str(index.path), warm_up=False)
  port = _free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}", model, index
  server.should_exit = True
  thread.join(10)
  engine.close()


@pytest.fixture(scope="module")
def browser():
  for program in ("chromium", "chromedriver"):
    if shutil.which(program) is None:
      raise FileNotFoundError(f"{program} is not installed: apt-get install chromium "
                              "chromium-driver (.ci/run does)")
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--autoplay-policy=no-user-gesture-required", "--mute-audio",
              "--window-size=1000,900"):
    options.add_argument(arg)
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(
      shutil.which("chromedriver")))
  yield driver
  driver.quit()


def test_search_listen_and_screenshot_in_a_browser(server, browser):
  url, model, index = server
  expected = model.search([QUERY], index, k=1)[0][0].name
  browser.get(url)
  wait = WebDriverWait(browser, 60)
  wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "corpus"), "20 clips"))
  browser.find_element(By.ID, "query").send_keys(QUERY)
  browser.find_element(By.ID, "go").click()
  wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 10)
  names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
  assert names[0] == expected
  assert "results 1-10 of 20 clips" in browser.find_element(By.ID, "status").text
  # Every thumbnail loaded as an image.
  wait.until(lambda d: d.execute_script(
      "return [...document.querySelectorAll('.thumb')].every(i => i.complete && "
      "i.naturalWidth === 192)"))

  played = browser.execute_async_script("""
      const done = arguments[arguments.length - 1];
      const audio = document.querySelector('#results audio');
      audio.play().then(() => setTimeout(() => done({duration: audio.duration,
          time: audio.currentTime, paused: audio.paused}), 700),
        (e) => done({error: String(e)}));""")
  assert "error" not in played, played
  assert played["duration"] > 0
  assert played["time"] > 0 or not played["paused"]
  browser.execute_script("document.querySelector('#results audio').pause()")
  SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
  browser.save_screenshot(str(SCREENSHOT))

  # The next page, then "more like this" on its first result.
  browser.find_element(By.ID, "next").click()
  wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"),
                                                               "results 11-20"))
  browser.find_element(By.CSS_SELECTOR, "#results .similar").click()
  wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"),
                                                               "more like"))

  # A traversal sent as written (a browser would normalise the dots away first).
  host, port = url.removeprefix("http://").split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=10)
  connection.request("GET", "/audio/../../etc/passwd")
  response = connection.getresponse()
  assert response.status == 404 and b"root:" not in response.read()
  browser.get(f"{url}/audio/../../etc/passwd")
  assert "404" in browser.find_element(By.TAG_NAME, "h1").text
