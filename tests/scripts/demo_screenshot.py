"""Screenshot of demo.py in use, for the README (docs/demo.png). Not run by CI.

Starts demo.py on a free local port, opens the page in headless Chromium (Playwright driving the
system's browser: `pip install playwright`, `apt-get install chromium`), draws a stroke on the canvas
with the mouse as a user would, clicks Generate, waits for the results and saves a screenshot.

    python tests/scripts/demo_screenshot.py --network training-runs/00000-digits-... --out docs/demo.png
"""

import os
import shutil
import sys

import click

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import demo

@click.command()
@click.option('--network', required=True, help='Network for the demo (snapshot or run folder)')
@click.option('--out', default=os.path.join(REPO, 'docs', 'demo.png'), show_default=True, help='Screenshot PNG')
@click.option('--browser', default=None, help='Chromium executable  [default: found on PATH]')
def main(network, out, browser):
    from playwright.sync_api import sync_playwright
    browser = browser or shutil.which('chromium') or shutil.which('chromium-browser')
    if browser is None:
        raise click.ClickException('No Chromium found: apt-get install chromium, or pass --browser')
    with demo.serving(network) as (url, _):
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=browser, args=['--no-sandbox'])
            page = b.new_page(viewport={'width': 1400, 'height': 1500})
            page.goto(url)
            page.wait_for_selector('canvas', timeout=60000)
            page.wait_for_timeout(2000)
            page.get_by_role('button', name='Brush', exact=True).click()
            page.wait_for_timeout(500)
            canvas = page.locator('canvas').first
            box = canvas.bounding_box()
            # A vertical stroke down the middle of the canvas and a short one across its top: a "7"-ish shape.
            cx, cy, w, h = box['x'], box['y'], box['width'], box['height']
            for (x0, y0), (x1, y1) in [((0.3, 0.25), (0.7, 0.25)), ((0.68, 0.27), (0.45, 0.8))]:
                page.mouse.move(cx + x0 * w, cy + y0 * h)
                page.mouse.down()
                for t in range(1, 21):
                    page.mouse.move(cx + (x0 + (x1 - x0) * t / 20) * w, cy + (y0 + (y1 - y0) * t / 20) * h)
                page.mouse.up()
            page.get_by_role('button', name='Generate').click()
            try:
                page.wait_for_selector('text=seed(s)', timeout=60000)
            except Exception:
                page.screenshot(path=out + '.failed.png', full_page=True)
                raise
            page.wait_for_timeout(2000)
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            page.screenshot(path=out, full_page=True)
            b.close()
        print(f'Saved {out}')

if __name__ == '__main__':
    main()
