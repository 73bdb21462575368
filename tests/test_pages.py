"""report.html (cause eval, cause report) and OUT/index.html (cause segment), opened in a real
browser: headless Chromium loads every picture from the files beside the page, and nothing on
the pages points at the network. Without Chromium the tests skip, and fail under CI=true."""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cause_cli.inference.report import GALLERY_PAGE_SIZE, gallery_page_name, gallery_pages

from .helpers import invoke, skip_or_fail_in_ci, train_small_run

CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const pictures = [...document.images];
  const loaded = pictures.filter((picture) => picture.complete && picture.naturalWidth > 0).length;
  document.title = `loaded ${loaded} of ${pictures.length}`;
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        skip_or_fail_in_ci("Chromium is not installed (apt-get install chromium)")
    assert found is not None
    return found


def browser(*arguments: str) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--host-resolver-rules=MAP * ~NOTFOUND", *arguments]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def pictures_loaded(page: Path) -> tuple[int, int]:
    """(pictures loaded, pictures) of ``page`` in Chromium: a copy beside it, eager loading, and
    a script that counts them into its title once the page has loaded."""
    text = page.read_text(encoding="utf-8").replace(' loading="lazy"', "")
    checked = page.with_name(f"check-{page.name}")
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    try:
        dom = browser("--virtual-time-budget=10000", "--dump-dom", checked.as_uri()).stdout
    finally:
        checked.unlink()
    title = re.search(r"<title>loaded (\d+) of (\d+)</title>", dom)
    assert title is not None, dom[:500]
    return int(title.group(1)), int(title.group(2))


class _Addresses(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[str] = []
        self.pictures: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.addresses.append(value)
                if tag == "img" and name == "src":
                    self.pictures.append(value)


def assert_offline(page: Path) -> list[str]:
    """Nothing on ``page`` is fetched from elsewhere than the files beside it; its pictures."""
    parser = _Addresses()
    text = page.read_text(encoding="utf-8")
    parser.feed(text)
    remote = [address for address in parser.addresses if re.match(r"^([a-z][a-z0-9+.-]*:|//)", address)]
    assert not remote, f"{page.name} points at {remote[:3]}"
    assert "url(" not in text and "@import" not in text and parser.scripts == 0
    return parser.pictures


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    scenes, run = train_small_run(root, num_val=5, seed=2)
    assert invoke("eval", "--run", run, "--no-baselines", "-q").exit_code == 0
    out = root / "segments"
    assert invoke("segment", scenes / "images" / "val", "--run", run, "--out", out, "-q").exit_code == 0
    return run, out


@pytest.mark.parametrize("page", ["report", "gallery"])
def test_each_page_loads_every_picture_offline_in_chromium(evaluated, page, tmp_path):
    run, out = evaluated
    path = run / "report.html" if page == "report" else out / "index.html"
    pictures = assert_offline(path)
    assert pictures and all((path.parent / picture).is_file() for picture in pictures)
    loaded, total = pictures_loaded(path)
    assert total == len(pictures) and loaded == total
    screenshot = tmp_path / f"{page}.png"
    browser("--window-size=1280,2000", f"--screenshot={screenshot}", path.as_uri())
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("CAUSE_SCREENSHOTS"):  # where a person wants to look at them
        shutil.copy(screenshot, Path(os.environ["CAUSE_SCREENSHOTS"]) / screenshot.name)


def test_a_missing_picture_is_found_by_the_browser(evaluated, tmp_path):
    run, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("feature-cache"))
    (copy / "confusion.png").unlink()  # the page, written before, still shows it
    loaded, total = pictures_loaded(copy / "report.html")
    assert loaded == total - 1


def test_cause_report_writes_the_page_again_and_refuses_a_run_not_evaluated(evaluated, tmp_path):
    run, _ = evaluated
    before = (run / "report.html").read_text(encoding="utf-8")
    (run / "report.html").unlink()
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert (run / "report.html").read_text(encoding="utf-8") == before
    empty = tmp_path / "not-evaluated"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("feature-cache", "metrics.json", "report.html"))
    refused = invoke("report", empty)
    assert refused.exit_code == 1 and "run cause eval" in refused.output


def test_the_gallery_is_paged_and_each_page_stays_small():
    entries = [{"input": f"photos/{index:05d}.jpg", "overlay": f"overlays/photos/{index:05d}.png",
                "label": f"labels/photos/{index:05d}.png"} for index in range(250)]  # fmt: skip
    entries.insert(7, {"input": "broken.jpg", "skipped": "not an image"})
    pages = list(gallery_pages(iter(entries), 250, ["sky", "sea"], image_root="../photos"))
    assert [name for name, _ in pages] == [gallery_page_name(page) for page in (1, 2, 3)]
    first, last = pages[0][1], pages[-1][1]
    assert first.count("<figure>") == GALLERY_PAGE_SIZE and last.count("<figure>") == 50
    assert "broken.jpg" not in "".join(text for _, text in pages)
    assert 'href="index-2.html">next' in first and 'href="index-2.html">previous' in last
    assert 'src="../photos/photos/00000.jpg"' in first
    assert len(first.encode()) < 80_000
