// Open main.py serve's page in headless Debian Chromium, choose a photo, and print, as JSON, the captions
// the page shows. Usage: node tests/serve_check.js http://127.0.0.1:PORT PHOTO.jpg SCREENSHOT.png
const { openPage } = require('./browser');

const [base, photo, screenshot] = process.argv.slice(2);

(async () => {
  const { browser, page, consoleErrors, outsideRequests } = await openPage({ width: 900, height: 1400 });
  await page.goto(base, { waitUntil: 'networkidle' });
  await page.setInputFiles('#file', photo);
  await page.waitForSelector('#captions li', { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById('map').naturalWidth > 0, null, { timeout: 30000 });
  const shown = await page.evaluate(() => ({
    title: document.title,
    captions: [...document.querySelectorAll('#captions li')].map((item) => item.firstChild.textContent),
    attentionMap: document.getElementById('map').naturalWidth,
    error: document.getElementById('error').textContent,
  }));
  await page.screenshot({ path: screenshot, fullPage: true });
  await browser.close();
  console.log(JSON.stringify({ ...shown, consoleErrors, outsideRequests }));
})().catch((error) => { console.error(error); process.exit(1); });
