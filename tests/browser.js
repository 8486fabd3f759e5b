// Headless Debian Chromium for the browser tests: a page that records its console errors and every
// request to a host other than 127.0.0.1 (the pages must work offline).
const { chromium } = require('playwright-core');

async function openPage(viewport) {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport });
  const consoleErrors = [];
  const outsideRequests = [];
  page.on('console', (message) => { if (message.type() === 'error') consoleErrors.push(message.text()); });
  page.on('pageerror', (error) => consoleErrors.push(String(error)));
  page.on('request', (request) => {
    const url = new URL(request.url());
    if (!['data:', 'blob:'].includes(url.protocol) && url.hostname !== '127.0.0.1') outsideRequests.push(request.url());
  });
  return { browser, page, consoleErrors, outsideRequests };
}

module.exports = { openPage };
