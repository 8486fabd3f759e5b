// Open a Visdom environment in headless Debian Chromium and print, as JSON, what the page shows.
// Usage: node tests/browser_check.js http://127.0.0.1:PORT ENV SCREENSHOT.png
const { openPage } = require('./browser');

const [base, env, screenshot] = process.argv.slice(2);

(async () => {
  const { browser, page, consoleErrors, outsideRequests } = await openPage({ width: 1600, height: 1400 });
  await page.goto(`${base}/env/${env}`, { waitUntil: 'networkidle' });
  await page.waitForSelector('.react-grid-item', { timeout: 30000 });
  await page.waitForTimeout(3000); // let plotly and images render
  const panes = await page.evaluate(() => [...document.querySelectorAll('.react-grid-item')].map((pane) => {
    const plot = pane.querySelector('.js-plotly-plot');
    return {
      title: ((pane.querySelector('.bar') || {}).innerText || '').split('\n').pop().trim(),
      text: pane.innerText,
      images: [...pane.querySelectorAll('img')].map((image) => image.naturalWidth),
      traces: plot && plot.data ? plot.data.map((trace) => ({ name: trace.name, points: trace.x.length })) : [],
    };
  }));
  await page.screenshot({ path: screenshot, fullPage: true });
  await browser.close();
  console.log(JSON.stringify({ panes, consoleErrors, outsideRequests }));
})().catch((error) => { console.error(error); process.exit(1); });
