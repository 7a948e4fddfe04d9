// End-to-end tests of the browser client: headless Chromium, the real
// wsticket binary, and an identity provider in Node, all on 127.0.0.1.
// Run through run.sh, which checks the prerequisites first. The last line is
// "N passed, N failed, N skipped"; the exit code is 1 when a test failed.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

import {
  assertNoSecretsInConsole,
  IdentityProvider,
  launchBrowser,
  openTestPage,
  pageState,
  SCREENSHOT_DIR,
  serveHelp,
  track,
  waitFor,
  Wsticket,
  WSTICKET_BIN,
} from './support.mjs';

const TEST_TIMEOUT_MS = 90_000;
/** Fast retries, so the tests wait seconds rather than the default half-minute cap. */
const QUICK_RETRIES = { initialDelayMs: 200, maxDelayMs: 1_000 };

const tests = [];
/**
 * Registers a test. `needs` names a `wsticket serve` flag the test depends
 * on; the test is skipped while the binary lacks that flag.
 */
function test(name, run, { needs = null } = {}) {
  tests.push({ name, run, needs });
}

/** Runs `body` with a server, a browser and the resources closed afterwards. */
async function withServerAndBrowser(provider, name, serverArgs, body) {
  const server = await Wsticket.start(provider, name, serverArgs);
  provider.wsticketOrigin = server.origin;
  const browser = await launchBrowser();
  try {
    await body(server, browser);
  } finally {
    await browser.close();
    await server.close();
  }
}

function errorsOf(state) {
  return state.events.filter((event) => event.type === 'error');
}

async function waitForPage(page, what, predicate, timeoutMs = 15_000) {
  return waitFor(what, async () => predicate(await pageState(page)), timeoutMs);
}

async function waitForGreeting(page, count = 1) {
  await waitForPage(page, `greeting ${count}`, (state) => state.messages.filter((m) => m.includes('"authenticated"')).length >= count);
}

test('round trip: login, ticket, connect, echo', async ({ provider }) => {
  await withServerAndBrowser(provider, 'round-trip', ['--allowed-origin', provider.origin], async (server, browser) => {
    const page = await openTestPage(browser, provider.origin, server);
    await waitForGreeting(page);
    const greeting = JSON.parse((await pageState(page)).messages[0]);
    assert.equal(greeting.type, 'authenticated');
    assert.equal(greeting.subject, 'browser-user');

    assert.equal(await page.evaluate(() => window.e2e.send('ping from chromium')), true);
    await waitForPage(page, 'the echo', (state) => state.messages.includes('ping from chromium'));

    const state = await pageState(page);
    assert.equal(state.state, 'open');
    assert.equal(state.opened, 1);
    assert.deepEqual(errorsOf(state), []);
    assert.deepEqual(state.tokenCalls, [{ refresh: false }]);
    assert.equal(state.ticketsSent, 1);
    assert.equal(await assertNoSecretsInConsole(browser, provider, [page]), 0);
  });
});

test('expired JWT reaches the page as auth', async ({ provider }) => {
  provider.tokenLifetime = -600;
  try {
    await withServerAndBrowser(provider, 'expired-jwt', ['--allowed-origin', provider.origin], async (server, browser) => {
      const page = await openTestPage(browser, provider.origin, server);
      await waitForPage(page, 'an error', (state) => errorsOf(state).length > 0);
      const state = await pageState(page);
      const [error] = errorsOf(state);
      assert.equal(error.kind, 'auth');
      assert.equal(error.code, 'token_expired');
      assert.equal(error.status, 401);
      assert.equal(error.willRetry, false);
      assert.deepEqual(state.tokenCalls, [{ refresh: false }, { refresh: true }], 'one refresh before giving up');
      assert.equal(state.ticketsSent, 0);
      assert.equal(state.state, 'closed');
      assert.equal(await page.textContent('#error-kind'), 'auth');
      await assertNoSecretsInConsole(browser, provider, [page]);
    });
  } finally {
    provider.tokenLifetime = 300;
  }
});

test('server restart: reconnects with a fresh ticket', async ({ provider }) => {
  await withServerAndBrowser(provider, 'restart', ['--allowed-origin', provider.origin], async (server, browser) => {
    const page = await openTestPage(browser, provider.origin, server, { clientOptions: QUICK_RETRIES });
    await waitForGreeting(page);

    await server.restart();
    await waitForGreeting(page, 2);
    assert.equal(await page.evaluate(() => window.e2e.send('after the restart')), true);
    await waitForPage(page, 'the echo after the restart', (state) => state.messages.includes('after the restart'));

    const state = await pageState(page);
    const close = state.events.find((event) => event.type === 'close');
    assert.equal(close.code, 1001, 'the server closed with 1001 on shutdown');
    assert.equal(close.willReconnect, true);
    assert.equal(state.opened, 2);
    assert.ok(state.ticketsSent >= 2);
    assert.equal(state.distinctTickets, state.ticketsSent, 'a ticket was sent twice');
    assert.ok(state.tokenCalls.every((call) => !call.refresh), 'a restart needs no token refresh');
    assert.ok(errorsOf(state).every((error) => error.kind === 'unavailable' && error.willRetry));
    await assertNoSecretsInConsole(browser, provider, [page]);
  });
});

test('reused ticket reaches the page as ticket_rejected', async ({ provider }) => {
  const args = ['--allowed-origin', provider.origin, '--reject-with', 'close'];
  await withServerAndBrowser(provider, 'reused-ticket', args, async (server, browser) => {
    const page = await openTestPage(browser, provider.origin, server, { consumeFirstTicket: true });
    await waitForPage(page, 'an error', (state) => errorsOf(state).length > 0);
    const state = await pageState(page);
    const [error] = errorsOf(state);
    assert.equal(error.kind, 'ticket_rejected');
    assert.equal(error.code, 'ticket_already_used');
    assert.equal(error.closeCode, 4403);
    assert.equal(error.willRetry, false);
    assert.equal(state.state, 'closed');
    assert.equal(await assertNoSecretsInConsole(browser, provider, [page]), 0);
  });
}, { needs: '--reject-with' });

test('reused ticket in http mode is retried', async ({ provider }) => {
  await withServerAndBrowser(provider, 'reused-ticket-http', ['--allowed-origin', provider.origin], async (server, browser) => {
    const page = await openTestPage(browser, provider.origin, server, { consumeFirstTicket: true, clientOptions: QUICK_RETRIES });
    await waitForGreeting(page);
    const state = await pageState(page);
    const [error] = errorsOf(state);
    // A refused upgrade in http mode is only close code 1006 to a browser.
    assert.equal(error.kind, 'unavailable');
    assert.equal(error.closeCode, 1006);
    assert.equal(error.willRetry, true);
    assert.equal(state.opened, 1);
    assert.equal(state.tokenCalls.length, 2);
    await assertNoSecretsInConsole(browser, provider, [page]);
  });
});

test('wrong Origin reaches the page as forbidden', async ({ provider }) => {
  const args = ['--allowed-origin', provider.origin, '--reject-with', 'close'];
  await withServerAndBrowser(provider, 'wrong-origin', args, async (server, browser) => {
    // The page runs on another origin and gets its ticket through its own backend.
    const page = await openTestPage(browser, provider.otherOrigin, server, { ticketVia: 'relay' });
    await waitForPage(page, 'an error', (state) => errorsOf(state).length > 0);
    const state = await pageState(page);
    const [error] = errorsOf(state);
    assert.equal(error.kind, 'forbidden');
    assert.equal(error.code, 'origin_not_allowed');
    assert.equal(error.closeCode, 4403);
    assert.equal(error.willRetry, false);
    assert.equal(state.state, 'closed');
    await assertNoSecretsInConsole(browser, provider, [page]);
  });
}, { needs: '--reject-with' });

test('wrong Origin in http mode is unavailable', async ({ provider }) => {
  await withServerAndBrowser(provider, 'wrong-origin-http', ['--allowed-origin', provider.origin], async (server, browser) => {
    const relayed = await openTestPage(browser, provider.otherOrigin, server, { ticketVia: 'relay', clientOptions: QUICK_RETRIES });
    // The ticket endpoint rejects the CORS preflight, which a page can only observe as a failed fetch.
    const direct = await openTestPage(browser, provider.otherOrigin, server, { clientOptions: QUICK_RETRIES });
    await waitForPage(relayed, 'two failed upgrades', (state) => errorsOf(state).length >= 2);
    await waitForPage(direct, 'two failed ticket requests', (state) => errorsOf(state).length >= 2);

    const relayedState = await pageState(relayed);
    assert.equal(relayedState.opened, 0);
    for (const error of errorsOf(relayedState)) {
      assert.equal(error.kind, 'unavailable');
      assert.equal(error.closeCode, 1006);
      assert.equal(error.willRetry, true);
    }
    const directState = await pageState(direct);
    assert.equal(directState.ticketsSent, 0);
    for (const error of errorsOf(directState)) {
      assert.equal(error.kind, 'unavailable');
      assert.equal(error.code, 'network_error');
    }
    await relayed.evaluate(() => window.e2e.connection.close());
    await direct.evaluate(() => window.e2e.connection.close());
  });
});

test('expired ticket reaches the page as auth after one refresh', async ({ provider }) => {
  const args = ['--allowed-origin', provider.origin, '--ticket-ttl', '1s', '--reject-with', 'close'];
  await withServerAndBrowser(provider, 'expired-ticket', args, async (server, browser) => {
    const page = await openTestPage(browser, provider.origin, server, { delayTicketsMs: 2_500 });
    await waitForPage(page, 'an error', (state) => errorsOf(state).length > 0, 20_000);
    const state = await pageState(page);
    const [error] = errorsOf(state);
    assert.equal(error.kind, 'auth');
    assert.equal(error.code, 'ticket_expired');
    assert.equal(error.closeCode, 4401);
    assert.equal(error.willRetry, false);
    assert.deepEqual(state.tokenCalls, [{ refresh: false }, { refresh: true }]);
    assert.equal(state.ticketsSent, 2);
    assert.equal(state.distinctTickets, 2);
    await assertNoSecretsInConsole(browser, provider, [page]);
  });
}, { needs: '--reject-with' });

test('expired ticket in http mode is retried', async ({ provider }) => {
  const args = ['--allowed-origin', provider.origin, '--ticket-ttl', '1s'];
  await withServerAndBrowser(provider, 'expired-ticket-http', args, async (server, browser) => {
    const page = await openTestPage(browser, provider.origin, server, { delayTicketsMs: 2_500, clientOptions: QUICK_RETRIES });
    await waitForPage(page, 'two errors', (state) => errorsOf(state).length >= 2, 30_000);
    await page.evaluate(() => window.e2e.connection.close());
    const state = await pageState(page);
    for (const error of errorsOf(state)) {
      assert.equal(error.kind, 'unavailable');
      assert.equal(error.closeCode, 1006);
      assert.equal(error.willRetry, true);
    }
    assert.equal(state.opened, 0);
    assert.equal(state.distinctTickets, state.ticketsSent);
  });
});

test('JWT expiry: refreshes and reconnects', async ({ provider }) => {
  provider.tokenLifetime = 4;
  try {
    const args = ['--allowed-origin', provider.origin, '--close-on-token-expiry'];
    await withServerAndBrowser(provider, 'jwt-expiry', args, async (server, browser) => {
      const page = await openTestPage(browser, provider.origin, server);
      await waitForGreeting(page);
      await waitForGreeting(page, 2);
      await page.evaluate(() => window.e2e.connection.close());

      const state = await pageState(page);
      const close = state.events.find((event) => event.type === 'close');
      assert.equal(close.code, 4401);
      assert.equal(close.willReconnect, true);
      assert.deepEqual(state.tokenCalls.slice(0, 2), [{ refresh: false }, { refresh: true }]);
      assert.deepEqual(errorsOf(state), [], 'a refreshed JWT is no error for the page');
      assert.equal(state.distinctTickets, state.ticketsSent);
      await assertNoSecretsInConsole(browser, provider, [page]);
    });
  } finally {
    provider.tokenLifetime = 300;
  }
}, { needs: '--close-on-token-expiry' });

test('two tabs share one JWT refresh', async ({ provider }) => {
  provider.tokenLifetime = 4;
  try {
    const args = ['--allowed-origin', provider.origin, '--close-on-token-expiry'];
    await withServerAndBrowser(provider, 'two-tabs', args, async (server, browser) => {
      const tabs = [
        await openTestPage(browser, provider.origin, server),
        await openTestPage(browser, provider.origin, server),
      ];
      for (const tab of tabs) await waitForGreeting(tab);
      for (const tab of tabs) await waitForGreeting(tab, 2);
      for (const tab of tabs) await tab.evaluate(() => window.e2e.connection.close());

      const states = await Promise.all(tabs.map((tab) => pageState(tab)));
      const refreshes = states.flatMap((state) => state.tokenCalls).filter((call) => call.refresh);
      assert.equal(refreshes.length, 1, `the tabs refreshed ${refreshes.length} times`);
      for (const state of states) {
        assert.equal(state.events.find((event) => event.type === 'close').code, 4401);
        assert.deepEqual(errorsOf(state), []);
      }
      const tickets = await Promise.all(tabs.map((tab) => tab.evaluate(() => [...window.e2e.tickets])));
      assert.equal(new Set(tickets.flat()).size, tickets.flat().length, 'two attempts sent the same ticket');
      await assertNoSecretsInConsole(browser, provider, tabs);
    });
  } finally {
    provider.tokenLifetime = 300;
  }
}, { needs: '--close-on-token-expiry' });

test('demo page renders a live connection', async () => {
  const demo = track(spawn(WSTICKET_BIN, ['demo', '--browser'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const exited = new Promise((resolve) => demo.on('exit', resolve));
  let output = '';
  demo.stdout.on('data', (chunk) => { output += chunk; });
  demo.stderr.on('data', (chunk) => { output += chunk; });
  const browser = await launchBrowser();
  try {
    const pageUrl = await waitFor('the demo to print its URL', () => output.match(/Open (http:\/\/127\.0\.0\.1:\d+\/) in a browser/)?.[1], 20_000);
    const page = await browser.context.newPage();
    await page.goto(pageUrl);
    await page.waitForSelector('#connection[data-state="open"]', { timeout: 15_000 });
    await page.waitForFunction(() => document.getElementById('subject').textContent === 'demo-user', null, { timeout: 15_000 });
    await page.click('button[type=submit]');
    await page.waitForFunction(() => document.getElementById('events').textContent.includes('echo: hello'), null, { timeout: 10_000 });
    assert.equal(await page.textContent('#status-text'), 'Connected');
    assert.equal(await page.isHidden('#problem'), true);

    mkdirSync(SCREENSHOT_DIR, { recursive: true });
    const path = join(SCREENSHOT_DIR, 'demo.png');
    await page.screenshot({ path, fullPage: true });
    console.log(`    screenshot: ${path}`);
    assert.deepEqual(browser.pageErrors, []);
  } finally {
    await browser.close();
    demo.kill('SIGINT');
    const timeout = new Promise((resolve) => setTimeout(() => resolve('timeout'), 40_000));
    if ((await Promise.race([exited, timeout])) === 'timeout') demo.kill('SIGKILL');
  }
});

async function main() {
  const only = process.argv[2];
  const help = await serveHelp();

  const provider = await IdentityProvider.start();
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  try {
    for (const { name, run, needs } of tests) {
      if (only && !name.includes(only)) continue;
      if (needs && !help.includes(needs)) {
        skipped += 1;
        console.log(`skip - ${name}: wsticket serve has no ${needs} yet`);
        continue;
      }
      const started = Date.now();
      let timer;
      const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${TEST_TIMEOUT_MS / 1000} s`)), TEST_TIMEOUT_MS);
      });
      try {
        await Promise.race([run({ provider }), timeout]);
        passed += 1;
        console.log(`ok - ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
      } catch (err) {
        failed += 1;
        console.log(`FAIL - ${name}: ${err.message}`);
      } finally {
        clearTimeout(timer);
      }
    }
  } finally {
    await provider.close();
  }
  console.log(`\n${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(failed > 0 ? 1 : 0);
}

await main();
