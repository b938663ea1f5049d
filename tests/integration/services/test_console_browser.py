"""The console in a real headless Chromium (selenium, ``/usr/bin/chromedriver``; ``.ci/run`` installs it) against a
real uvicorn server over SQLite, a local blob dir and the tiny backbone: sign in, the lineage graph's nodes, a QA
heatmap, a rollback that moves ``live`` in the database, a request without the CSRF token refused, a shared task's
page and its QA report in an enrolled user's experts, and a second tenant kept out. Screenshots of each step are
saved to a folder the test prints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from api_helpers import ADMIN_KEY, SERVING_OPTIONS, ApiServer
from console_data import build_fleet
from services.api.app import create_app
from services.api.runtime import ApiServices

from lorafleet.config import load_settings

CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not CHROMEDRIVER.exists(), reason="needs chromium and chromium-driver (apt-get install, as .ci/run does)"
)


@pytest.fixture
def server(api_data_dir: Path, sqlite_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    settings = load_settings(
        data_dir=api_data_dir,
        database_url=sqlite_url,
        object_store_url=(tmp_path / "blobs").as_uri(),
        device="cpu",
        ray_address="",
        admin_key=ADMIN_KEY,
        promote_rule="never",
    )
    running = ApiServer(create_app(settings, options=SERVING_OPTIONS)).start()
    yield running
    running.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_console_in_a_real_browser(
    server: ApiServer, browser: object, adapter_folder: Callable[[int], Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    driver = browser
    services: ApiServices = server.server.config.app.state.services
    fleet = build_fleet(services, adapter_folder)
    shots = tmp_path / "console-screenshots"
    shots.mkdir()
    print(f"console screenshots: {shots}")
    wait = WebDriverWait(driver, 30)

    def shot(name: str) -> None:
        assert driver.save_screenshot(str(shots / f"{name}.png"))

    def sign_in(key: str) -> None:
        driver.get(f"{server.url}/console/")
        field = wait.until(ec.presence_of_element_located((By.ID, "api_key")))
        field.send_keys(key)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        # the signed-in page (its cookie is set): only it has a sign-out form. Not staleness_of(field): while the
        # page is replaced, Chromium may answer "Node with given id does not belong to the document", which
        # selenium raises as an unknown error, not as the stale element that wait would catch
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "form.sign-out")))

    def live_number() -> int | None:
        live = services.registry.live_version(tenant_id=fleet.tenant_id, adapter_id=fleet.adapter_id)
        return None if live is None else live.number

    # sign in: the overview lists alice and the running job with its progress bar
    sign_in(fleet.api_key)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-user="alice"]')))
    assert driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{fleet.running_job_id}"] progress')
    shot("1-overview")

    # the user page: the lineage graph's nodes (two versions, their snapshots and jobs)
    driver.find_element(By.LINK_TEXT, "alice").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "svg.lineage")))
    nodes = driver.find_elements(By.CSS_SELECTOR, "svg.lineage g.node")
    keys = {n.get_attribute("data-node") for n in nodes}
    v1, v2 = fleet.version_ids
    assert keys == {f"{kind}-{v}" for kind in ("version", "snapshot", "job") for v in (v1, v2)}
    assert all(n.is_displayed() for n in nodes)
    assert len(driver.find_elements(By.CSS_SELECTOR, "figure.curve polyline")) == 2
    shot("2-user")

    # a QA report: the heatmap's rows and columns
    driver.find_element(By.PARTIAL_LINK_TEXT, f"QA report {fleet.report_id}").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.heatmap")))
    assert len(driver.find_elements(By.CSS_SELECTOR, "table.heatmap tbody tr")) == 2
    assert len(driver.find_elements(By.CSS_SELECTOR, "table.heatmap td.heat")) == 6
    shot("3-qa-heatmap")

    # roll back to v1 with a reason (the page asks to confirm): live moves in the database
    driver.find_element(By.PARTIAL_LINK_TEXT, "alice, adapter personal").click()
    form = wait.until(ec.presence_of_element_located((By.ID, "rollback")))
    Select(form.find_element(By.ID, "rollback-to")).select_by_value("1")
    form.find_element(By.ID, "rollback-reason").send_keys("v2 answers rudely")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'table.history tr[data-to="1"]')))
    assert live_number() == 1
    event = services.registry.alias_history(tenant_id=fleet.tenant_id, adapter_id=fleet.adapter_id)[-1]
    assert (event.reason, event.actor) == ("v2 answers rudely", f"console:{fleet.tenant_name}")
    shot("4-rolled-back")

    # the same form posted without its CSRF token, from the signed-in page: 403, nothing moves
    status = driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch('/console/users/alice/adapters/personal/rollback', {method: 'POST', credentials: 'same-origin',
              body: new URLSearchParams({to_version: '', reason: 'forged'})}).then(r => done(r.status));"""
    )
    assert status == 403 and live_number() == 1

    # the shared task alice is enrolled in (linked from her page): its lineage, and its QA report in her experts
    driver.find_element(By.LINK_TEXT, "summarise").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "svg.lineage g.node")))
    assert driver.find_element(By.TAG_NAME, "h1").text == "Shared task summarise"
    shot("5-task")
    driver.find_element(By.PARTIAL_LINK_TEXT, f"QA report {fleet.task_report_id}").click()
    bank = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, 'section.enrolled-bank[data-user="alice"]'))
    )
    assert len(bank.find_elements(By.CSS_SELECTOR, "table.heatmap td.heat")) == 6
    driver.execute_script("arguments[0].scrollIntoView()", bank)
    shot("6-task-qa")

    # on a narrow screen the page still lays out (one column)
    driver.get(f"{server.url}/console/users/alice")
    driver.set_window_size(420, 900)
    driver.refresh()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "svg.lineage")))
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 440
    shot("7-narrow")
    driver.set_window_size(1280, 1000)

    # a second tenant: signed in with its own key, alice's pages are not found
    driver.find_element(By.CSS_SELECTOR, "form.sign-out button").click()
    wait.until(ec.presence_of_element_located((By.ID, "api_key")))
    sign_in(fleet.other_key)
    wait.until(ec.presence_of_element_located((By.TAG_NAME, "h1")))
    driver.get(f"{server.url}/console/users/alice")
    error = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "p.error")))
    assert error.get_attribute("data-status") == "404"
    driver.get(f"{server.url}/console/users/alice/adapters/personal/versions/2/qa")
    assert (
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "p.error"))).get_attribute("data-status")
        == "404"
    )
    shot("8-other-tenant-404")
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-overview.png",
        "2-user.png",
        "3-qa-heatmap.png",
        "4-rolled-back.png",
        "5-task.png",
        "6-task-qa.png",
        "7-narrow.png",
        "8-other-tenant-404.png",
    ]
