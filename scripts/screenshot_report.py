"""Screenshot a `lowbit report` HTML page in headless Chromium, and fail on any error it reports.

    python scripts/screenshot_report.py REPORT.html --out shot.png [--width 1400]

Two Chromium runs: the first loads a copy of the page with a small probe script that records
failed resource loads, script errors and console.error calls, and measures the page's height;
the second takes the full-page screenshot at that height. Either run's console errors fail it.
Needs Debian's `chromium` (apt-get install -y chromium)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_HEIGHT = 16000  # Chromium's screenshots break past its texture size limit

PROBE = """<script>(function(){
var errs=[];
window.addEventListener('error',function(e){var t=e.target,u=t&&t!==window&&(t.src||t.href);
  errs.push(u?'failed to load '+(u.baseVal||u):'script error: '+e.message);},true);
window.addEventListener('unhandledrejection',function(e){errs.push('unhandled rejection: '+e.reason);});
var ce=console.error;console.error=function(){
  errs.push('console.error: '+Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};
window.addEventListener('load',function(){setTimeout(function(){var p=document.createElement('pre');p.id='__lowbit_probe';
  p.textContent=JSON.stringify({errors:errs,height:document.documentElement.scrollHeight});
  document.body.appendChild(p);},0);});
})();</script>"""

CONSOLE_ERROR = re.compile(r'CONSOLE.*"(Uncaught|.*(Error|Failed|Refused)).*')


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("screenshot_report: no chromium found (apt-get install -y chromium)")


def run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


def console_errors(stderr: str) -> list[str]:
    return [m.group(0) for m in CONSOLE_ERROR.finditer(stderr)]


def probe(page: Path, width: int) -> tuple[list[str], int]:
    """Errors seen while loading ``page`` and its height in CSS pixels at ``width``."""
    html = page.read_text(encoding="utf-8")
    i = html.find("<head>")
    at = i + len("<head>") if i >= 0 else 0
    # the copy sits beside the page, so relative references resolve as they would for the page
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, prefix=".probe-", delete=False) as f:
        f.write(html[:at] + PROBE + html[at:])
    copy = Path(f.name)
    try:
        done = run([f"--window-size={width},1000", "--dump-dom", copy.resolve().as_uri()])
    finally:
        copy.unlink(missing_ok=True)
    m = re.search(r'<pre id="__lowbit_probe">(.*?)</pre>', done.stdout, flags=re.S)
    if not m:
        return [f"the page did not finish loading (chromium exit {done.returncode})"], 0
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    return found["errors"] + console_errors(done.stderr), int(found["height"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("page", type=Path, metavar="REPORT.html")
    p.add_argument("--out", type=Path, required=True, metavar="SHOT.png")
    p.add_argument("--width", type=int, default=1400)
    args = p.parse_args(argv)
    if not args.page.is_file():
        print(f"screenshot_report: {args.page}: no such file", file=sys.stderr)
        return 1
    errors, height = probe(args.page, args.width)
    if not errors:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shot = run([f"--window-size={args.width},{min(max(height, 200), MAX_HEIGHT)}",
                    f"--screenshot={args.out.resolve()}", args.page.resolve().as_uri()])
        errors = console_errors(shot.stderr)
        if shot.returncode != 0 or not args.out.is_file():
            errors.append(f"no screenshot written (chromium exit {shot.returncode})")
    if errors:
        print(f"screenshot_report: {args.page}: {'; '.join(errors)}", file=sys.stderr)
        return 1
    note = f" (cut at {MAX_HEIGHT} of {height} px)" if height > MAX_HEIGHT else ""
    print(f"{args.out}: {args.width}x{min(height, MAX_HEIGHT)}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
