import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { backoffDelay, connect, DEFAULTS, ERROR_KINDS, parseRetryAfter, WsTicketError } from '../wsticket-client.js';
import { FakeClock, fakeBroadcastChannel, fakeFetch, fakeWebSocket, settle } from './fakes.js';

const TICKET_URL = 'https://app.example.test/websocket/ticket';
const WS_URL = 'wss://app.example.test/ws';
const TOKEN = 'eyJhbGciOiJFZERTQSJ9.first-token.signature';
const REFRESHED = 'eyJhbGciOiJFZERTQSJ9.refreshed-token.signature';

const LIMITS = { initialDelayMs: 100, maxDelayMs: 1_600, factor: 2, jitter: 0.5 };

// Every console method is replaced for the whole file. The last test checks
// that the client wrote nothing, so no ticket or token can have reached it.
const consoleCalls = [];
const originalConsole = {};
const CONSOLE_METHODS = ['log', 'info', 'warn', 'error', 'debug', 'trace', 'dir', 'dirxml', 'table', 'group', 'groupCollapsed', 'assert', 'count', 'timeLog'];
before(() => {
  for (const method of CONSOLE_METHODS) {
    originalConsole[method] = console[method];
    console[method] = (...args) => consoleCalls.push({ method, args });
  }
});
after(() => {
  Object.assign(console, originalConsole);
});

/** Creates a connection on fakes; `handler` and `behaviour` play the server. */
function setup({ handler, behaviour, tokens = [TOKEN], options = {}, channel = null, random = () => 0.5 } = {}) {
  const clock = options.clock ?? new FakeClock();
  const endpoint = fakeFetch(handler);
  const socketServer = fakeWebSocket(behaviour);
  const tokenCalls = [];
  let nextToken = 0;
  const getToken = async (context) => {
    tokenCalls.push(context);
    const token = tokens[Math.min(nextToken, tokens.length - 1)];
    nextToken += 1;
    return token;
  };
  const events = [];
  const connection = connect(TICKET_URL, WS_URL, getToken, {
    ...LIMITS,
    fetch: endpoint.fetch,
    WebSocket: socketServer.WebSocket,
    BroadcastChannel: channel,
    now: clock.now,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random,
    ...options,
  });
  connection.onopen = (event) => events.push(event);
  connection.onmessage = (event) => events.push(event);
  connection.onclose = (event) => events.push(event);
  connection.onerror = (error) => events.push(error);
  const errors = () => events.filter((event) => event instanceof WsTicketError);
  return { clock, connection, events, errors, calls: endpoint.calls, sockets: socketServer.sockets, tokenCalls };
}

/** Checks that no event or error text contains a ticket or a token. */
function assertNoSecrets(events, calls) {
  const secrets = [TOKEN, REFRESHED, ...calls.map((call) => call.ticket).filter(Boolean)];
  for (const event of events) {
    const text = `${event.message ?? ''} ${JSON.stringify(event)}`;
    for (const secret of secrets) assert.ok(!text.includes(secret), 'an event contains a ticket or token');
  }
}

describe('backoffDelay', () => {
  test('stays within the jitter bounds', () => {
    const limits = { ...DEFAULTS, initialDelayMs: 500, maxDelayMs: 30_000, factor: 2, jitter: 0.5 };
    for (let attempt = 1; attempt <= 15; attempt++) {
      const ceiling = Math.min(30_000, 500 * 2 ** (attempt - 1));
      const highest = backoffDelay(attempt, limits, () => 0);
      const lowest = backoffDelay(attempt, limits, () => 0.999999);
      assert.equal(highest, ceiling, `attempt ${attempt}: random 0 gives the full delay`);
      assert.ok(lowest >= ceiling * 0.5, `attempt ${attempt}: ${lowest} is below half of ${ceiling}`);
      assert.ok(lowest <= ceiling, `attempt ${attempt}: ${lowest} exceeds ${ceiling}`);
    }
  });

  test('caps at maxDelayMs', () => {
    const limits = { ...DEFAULTS, initialDelayMs: 500, maxDelayMs: 4_000, factor: 3, jitter: 0.2 };
    assert.equal(backoffDelay(50, limits, () => 0), 4_000);
    assert.ok(backoffDelay(50, limits, () => 0.99) >= 3_200);
  });

  test('without jitter is exact', () => {
    const limits = { ...DEFAULTS, initialDelayMs: 100, maxDelayMs: 10_000, factor: 2, jitter: 0 };
    assert.deepEqual([1, 2, 3, 4].map((n) => backoffDelay(n, limits, Math.random)), [100, 200, 400, 800]);
  });

  test('spreads delays with Math.random', () => {
    const limits = { ...DEFAULTS, initialDelayMs: 1_000, maxDelayMs: 1_000, jitter: 0.5 };
    const delays = new Set(Array.from({ length: 200 }, () => backoffDelay(3, limits)));
    assert.ok(delays.size > 20, `only ${delays.size} distinct delays`);
    for (const delay of delays) assert.ok(delay >= 500 && delay <= 1_000, `delay ${delay} out of bounds`);
  });
});

describe('parseRetryAfter', () => {
  test('reads seconds and HTTP dates', () => {
    assert.equal(parseRetryAfter('7'), 7_000);
    const now = Date.parse('2030-01-01T00:00:00Z');
    assert.equal(parseRetryAfter('Tue, 01 Jan 2030 00:00:05 GMT', now), 5_000);
  });

  test('returns null for missing or malformed values', () => {
    assert.equal(parseRetryAfter(null), null);
    assert.equal(parseRetryAfter(''), null);
    assert.equal(parseRetryAfter('soon'), null);
  });
});

describe('connect', () => {
  test('requests a ticket and opens the WebSocket with it', async () => {
    const { clock, connection, events, calls, sockets } = setup({
      behaviour: (socket) => {
        socket.serverOpen();
        socket.serverMessage('{"type":"authenticated"}');
      },
    });
    await clock.runUntil(() => events.some((event) => event.type === 'message'));

    assert.equal(calls.length, 1);
    assert.equal(calls[0].method, 'POST');
    assert.equal(calls[0].url, TICKET_URL);
    assert.equal(calls[0].authorization, `Bearer ${TOKEN}`);
    assert.equal(sockets.length, 1);
    assert.equal(sockets[0].ticket, calls[0].ticket);
    assert.ok(sockets[0].url.startsWith(`${WS_URL}?ticket=`));
    assert.equal(connection.state, 'open');
    assert.deepEqual(events.map((event) => event.type), ['open', 'message']);
    assert.equal(events[1].data, '{"type":"authenticated"}');

    assert.equal(connection.send('hello'), true);
    assert.deepEqual(sockets[0].sent, ['hello']);
    connection.close();
    assert.equal(connection.state, 'closed');
    assert.equal(connection.send('late'), false);
  });

  test('send returns false before the socket opens', async () => {
    const { clock, connection, sockets } = setup({ behaviour: () => {} });
    await clock.runUntil(() => sockets.length === 1);
    assert.equal(connection.state, 'connecting');
    assert.equal(connection.send('early'), false);
    connection.close();
  });

  test('rejects a getToken that is not a function', () => {
    assert.throws(() => connect(TICKET_URL, WS_URL, 'token'), TypeError);
  });
});

describe('ticket endpoint errors', () => {
  const cases = [
    { name: '401 missing_token', answer: { status: 401, body: { error: 'missing_token', message: 'm' } }, kind: 'auth', code: 'missing_token', willRetry: false },
    { name: '401 invalid_token', answer: { status: 401, body: { error: 'invalid_token', message: 'm' } }, kind: 'auth', code: 'invalid_token', willRetry: false },
    { name: '403 origin_not_allowed', answer: { status: 403, body: { error: 'origin_not_allowed', message: 'm' } }, kind: 'forbidden', code: 'origin_not_allowed', willRetry: false },
    { name: '429 rate_limited', answer: { status: 429, body: { error: 'rate_limited', message: 'm' }, headers: { 'Retry-After': '3' } }, kind: 'rate_limited', code: 'rate_limited', willRetry: true },
    { name: '503 auth_unavailable', answer: { status: 503, body: { error: 'auth_unavailable', message: 'm' }, headers: { 'Retry-After': '1' } }, kind: 'unavailable', code: 'auth_unavailable', willRetry: true },
    { name: '503 store_unavailable', answer: { status: 503, body: { error: 'store_unavailable', message: 'm' } }, kind: 'unavailable', code: 'store_unavailable', willRetry: true },
    { name: 'network failure', answer: 'network', kind: 'unavailable', code: 'network_error', willRetry: true },
    { name: '200 without a ticket', answer: { status: 200, body: { nothing: true } }, kind: 'unavailable', code: 'invalid_response', willRetry: true },
    { name: '502 without a body', answer: { status: 502 }, kind: 'unavailable', code: null, willRetry: true },
  ];
  for (const { name, answer, kind, code, willRetry } of cases) {
    test(`${name} is ${kind}`, async () => {
      const { clock, connection, events, errors, calls, sockets } = setup({ handler: () => answer });
      await clock.runUntil(() => errors().length === 1);
      const [error] = errors();
      assert.equal(error.kind, kind);
      assert.equal(error.code, code);
      assert.equal(error.willRetry, willRetry);
      assert.ok(ERROR_KINDS.includes(error.kind));
      assert.equal(sockets.length, 0, 'no WebSocket without a ticket');
      if (!willRetry) {
        assert.equal(connection.state, 'closed');
        await clock.advance(60_000);
        assert.equal(calls.length, 1, 'a stop error is not retried');
      } else {
        await clock.runUntil(() => calls.length === 2);
        connection.close();
      }
      assertNoSecrets(events, calls);
    });
  }

  test('429 waits for Retry-After before the next request', async () => {
    let first = true;
    const { clock, connection, errors, calls } = setup({
      handler: () => {
        if (!first) return undefined;
        first = false;
        return { status: 429, body: { error: 'rate_limited' }, headers: { 'Retry-After': '7' } };
      },
    });
    await clock.runUntil(() => errors().length === 1);
    const failedAt = clock.now();
    assert.equal(errors()[0].retryAfterMs, 7_000);
    await clock.runUntil(() => calls.length === 2);
    assert.ok(clock.now() - failedAt >= 7_000, `retried after ${clock.now() - failedAt} ms`);
    connection.close();
  });

  test('401 token_expired refreshes the token once and retries', async () => {
    const { clock, connection, events, errors, calls, tokenCalls } = setup({
      tokens: [TOKEN, REFRESHED],
      handler: (call) => (call.authorization === `Bearer ${TOKEN}` ? { status: 401, body: { error: 'token_expired' } } : undefined),
    });
    await clock.runUntil(() => connection.state === 'open');
    assert.deepEqual(tokenCalls, [{ refresh: false }, { refresh: true }]);
    assert.equal(calls[1].authorization, `Bearer ${REFRESHED}`);
    assert.equal(errors().length, 0);
    assert.ok(events.some((event) => event.type === 'open'));
    connection.close();
  });

  test('401 token_expired twice is auth', async () => {
    const { clock, connection, errors, calls, tokenCalls } = setup({
      tokens: [TOKEN],
      handler: () => ({ status: 401, body: { error: 'token_expired' } }),
    });
    await clock.runUntil(() => errors().length === 1);
    assert.equal(errors()[0].kind, 'auth');
    assert.equal(errors()[0].code, 'token_expired');
    assert.equal(errors()[0].willRetry, false);
    assert.equal(tokenCalls.length, 2);
    await clock.advance(60_000);
    assert.equal(calls.length, 2);
    assert.equal(connection.state, 'closed');
  });

  test('getToken failure is auth and stops', async () => {
    const { clock, connection, errors, calls } = setup();
    const failing = connect(TICKET_URL, WS_URL, async () => {
      throw new Error('not logged in');
    }, { fetch: () => assert.fail('no ticket request without a token'), WebSocket: class {}, BroadcastChannel: null, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now });
    const seen = [];
    failing.onerror = (error) => seen.push(error);
    await clock.runUntil(() => seen.length === 1);
    assert.equal(seen[0].kind, 'auth');
    assert.equal(seen[0].code, 'token_unavailable');
    assert.equal(failing.state, 'closed');
    connection.close();
    assert.equal(errors().length, 0);
    assert.ok(calls.length <= 1);
  });

  test('getToken failure with kind unavailable is retried', async () => {
    const clock = new FakeClock();
    let calls = 0;
    const failing = connect(TICKET_URL, WS_URL, async () => {
      calls += 1;
      throw Object.assign(new Error('identity provider down'), { kind: 'unavailable' });
    }, { ...LIMITS, fetch: () => assert.fail('no ticket request without a token'), WebSocket: class {}, BroadcastChannel: null, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now });
    const seen = [];
    failing.onerror = (error) => seen.push(error);
    await clock.runUntil(() => calls === 3);
    assert.equal(seen[0].kind, 'unavailable');
    assert.equal(seen[0].willRetry, true);
    failing.close();
  });
});

describe('close codes', () => {
  test('4401 refreshes the token and reconnects once', async () => {
    const { clock, connection, errors, calls, sockets, tokenCalls } = setup({
      tokens: [TOKEN, REFRESHED],
      behaviour: (socket) => {
        if (socket === firstSocket()) socket.serverReject(4401, { error: 'token_expired' });
        else socket.serverAccept();
      },
    });
    let firstSocketRef = null;
    function firstSocket() {
      firstSocketRef ??= sockets[0];
      return firstSocketRef;
    }
    await clock.runUntil(() => sockets.length === 2 && connection.state === 'open');
    assert.deepEqual(tokenCalls, [{ refresh: false }, { refresh: true }]);
    assert.equal(calls[1].authorization, `Bearer ${REFRESHED}`);
    assert.notEqual(sockets[0].ticket, sockets[1].ticket);
    assert.equal(errors().length, 0);
    connection.close();
  });

  test('4401 twice in a row is auth', async () => {
    const { clock, connection, events, errors, calls, sockets, tokenCalls } = setup({
      tokens: [TOKEN, REFRESHED],
      behaviour: (socket) => socket.serverReject(4401, { error: 'ticket_expired' }),
    });
    await clock.runUntil(() => errors().length === 1);
    assert.equal(errors()[0].kind, 'auth');
    assert.equal(errors()[0].code, 'ticket_expired');
    assert.equal(errors()[0].closeCode, 4401);
    assert.equal(errors()[0].willRetry, false);
    assert.equal(tokenCalls.length, 2);
    await clock.advance(60_000);
    assert.equal(sockets.length, 2, 'no reconnect after an auth error');
    assert.equal(calls.length, 2);
    assert.equal(connection.state, 'closed');
    const lastClose = events.filter((event) => event.type === 'close').at(-1);
    assert.equal(lastClose.willReconnect, false);
  });

  test('4401 with a bare reason passes the code on', async () => {
    const { clock, errors } = setup({
      behaviour: (socket) => {
        socket.serverOpen();
        socket.serverClose(4401, 'token_expired');
      },
    });
    await clock.runUntil(() => errors().length === 1);
    assert.equal(errors()[0].kind, 'auth');
    assert.equal(errors()[0].code, 'token_expired');
  });

  test('4401 after a long open connection refreshes again', async () => {
    const { clock, connection, sockets, tokenCalls } = setup({
      tokens: [TOKEN, REFRESHED, 'third.token.value'],
      behaviour: (socket) => socket.serverAccept(),
    });
    await clock.runUntil(() => connection.state === 'open');
    sockets[0].serverClose(4401, JSON.stringify({ error: 'token_expired' }));
    await clock.runUntil(() => sockets.length === 2 && connection.state === 'open');
    sockets[1].serverClose(4401, JSON.stringify({ error: 'token_expired' }));
    await clock.runUntil(() => sockets.length === 3 && connection.state === 'open');
    assert.deepEqual(tokenCalls.map((context) => context.refresh), [false, true, true]);
    connection.close();
  });

  const stops = [
    { code: 4403, error: 'ticket_already_used', kind: 'ticket_rejected' },
    { code: 4403, error: 'invalid_ticket', kind: 'ticket_rejected' },
    { code: 4403, error: 'origin_not_allowed', kind: 'forbidden' },
    { code: 4400, error: 'invalid_request', kind: 'ticket_rejected' },
    { code: 1008, error: null, kind: 'ticket_rejected' },
  ];
  for (const { code, error, kind } of stops) {
    test(`${code} ${error ?? 'without a reason'} is ${kind} and stops`, async () => {
      const { clock, connection, errors, calls, sockets, tokenCalls } = setup({
        behaviour: (socket) => (error ? socket.serverReject(code, { error }) : (socket.serverOpen(), socket.serverClose(code, 'Policy violation.'))),
      });
      await clock.runUntil(() => errors().length === 1);
      assert.equal(errors()[0].kind, kind);
      assert.equal(errors()[0].code, error);
      assert.equal(errors()[0].closeCode, code);
      assert.equal(errors()[0].willRetry, false);
      await clock.advance(120_000);
      assert.equal(sockets.length, 1);
      assert.equal(calls.length, 1);
      assert.equal(tokenCalls.length, 1, 'no token refresh on 4403');
      assert.equal(connection.state, 'closed');
    });
  }

  test('4429 waits for retry_after from the reason', async () => {
    const { clock, connection, errors, sockets } = setup({
      behaviour: (socket) => (sockets.length === 1 ? socket.serverReject(4429, { error: 'rate_limited', retry_after: 9 }) : socket.serverAccept()),
    });
    await clock.runUntil(() => errors().length === 1);
    const rejectedAt = clock.now();
    assert.equal(errors()[0].kind, 'rate_limited');
    assert.equal(errors()[0].retryAfterMs, 9_000);
    assert.equal(errors()[0].willRetry, true);
    await clock.advance(8_000);
    assert.equal(sockets.length, 1, 'no attempt before retry_after');
    await clock.runUntil(() => connection.state === 'open');
    assert.ok(clock.now() - rejectedAt >= 9_000);
    assert.equal(sockets.length, 2);
    connection.close();
  });

  for (const [code, error] of [[4502, 'upstream_unavailable'], [4503, 'store_unavailable']]) {
    test(`${code} retries with growing back-off`, async () => {
      const { clock, connection, errors, sockets } = setup({
        random: () => 0,
        behaviour: (socket) => (sockets.length <= 4 ? socket.serverReject(code, { error }) : socket.serverAccept()),
      });
      const attemptTimes = [];
      await clock.runUntil(() => {
        if (attemptTimes.length < sockets.length) attemptTimes.push(clock.now());
        return connection.state === 'open';
      });
      assert.deepEqual(errors().map((e) => e.kind), ['unavailable', 'unavailable', 'unavailable', 'unavailable']);
      assert.deepEqual(errors().map((e) => e.code), [error, error, error, error]);
      assert.ok(errors().every((e) => e.willRetry));
      const gaps = attemptTimes.slice(1).map((time, i) => time - attemptTimes[i]);
      assert.deepEqual(gaps, [100, 200, 400, 800]);
      connection.close();
    });
  }

  test('back-off stays within bounds and caps with jitter', async () => {
    let draw = 0;
    const { clock, connection, sockets } = setup({
      random: () => [0, 0.99][draw++ % 2],
      behaviour: (socket) => socket.serverClose(1006),
    });
    const attemptTimes = [];
    await clock.runUntil(() => {
      if (attemptTimes.length < sockets.length) attemptTimes.push(clock.now());
      return sockets.length >= 9;
    });
    connection.close();
    const gaps = attemptTimes.slice(1).map((time, i) => time - attemptTimes[i]);
    gaps.forEach((gap, i) => {
      const ceiling = Math.min(LIMITS.maxDelayMs, LIMITS.initialDelayMs * 2 ** i);
      assert.ok(gap <= ceiling, `gap ${i + 1} is ${gap} ms, above ${ceiling}`);
      assert.ok(gap >= ceiling * (1 - LIMITS.jitter), `gap ${i + 1} is ${gap} ms, below ${ceiling / 2}`);
    });
    assert.ok(gaps.at(-1) <= LIMITS.maxDelayMs);
  });

  test('a drop after open reconnects with a new ticket', async () => {
    const { clock, connection, events, sockets, calls } = setup();
    await clock.runUntil(() => connection.state === 'open');
    sockets[0].serverClose(1001, 'server shutting down');
    await clock.runUntil(() => sockets.length === 2 && connection.state === 'open');
    const close = events.find((event) => event.type === 'close');
    assert.equal(close.code, 1001);
    assert.equal(close.willReconnect, true);
    assert.equal(calls.length, 2);
    assert.notEqual(sockets[0].ticket, sockets[1].ticket);
    connection.close();
  });

  test('a socket that never opens times out and is retried', async () => {
    const { clock, connection, errors, sockets } = setup({
      options: { openTimeoutMs: 2_000 },
      behaviour: (socket) => (sockets.length === 1 ? undefined : socket.serverAccept()),
    });
    await clock.runUntil(() => connection.state === 'open');
    assert.equal(errors()[0].kind, 'unavailable');
    assert.ok(sockets[0].closedByClient, 'the stalled socket was closed');
    connection.close();
  });

  test('maxRetries stops the retries', async () => {
    const { clock, connection, errors, calls } = setup({ options: { maxRetries: 3 }, handler: () => 'network' });
    await clock.runUntil(() => connection.state === 'closed');
    assert.equal(calls.length, 4);
    assert.deepEqual(errors().map((e) => e.willRetry), [true, true, true, false]);
    await clock.advance(60_000);
    assert.equal(calls.length, 4);
  });
});

describe('close()', () => {
  test('no reconnect after close() while open', async () => {
    const { clock, connection, events, calls, sockets } = setup();
    await clock.runUntil(() => connection.state === 'open');
    connection.close(1000, 'bye');
    assert.deepEqual(sockets[0].closedByClient, { code: 1000, reason: 'bye' });
    await clock.advance(120_000);
    assert.equal(calls.length, 1);
    assert.equal(sockets.length, 1);
    const close = events.filter((event) => event.type === 'close');
    assert.equal(close.length, 1);
    assert.equal(close[0].willReconnect, false);
  });

  test('no reconnect after close() while waiting', async () => {
    const { clock, connection, errors, calls } = setup({ handler: () => 'network' });
    await clock.runUntil(() => errors().length === 1);
    assert.equal(connection.state, 'waiting');
    connection.close();
    await clock.advance(120_000);
    assert.equal(calls.length, 1);
    assert.equal(clock.timers.size, 0, 'no timer left behind');
  });

  test('no reconnect after close() while connecting', async () => {
    const { clock, connection, calls, sockets } = setup({ behaviour: () => {} });
    await clock.runUntil(() => sockets.length === 1);
    connection.close();
    await clock.advance(120_000);
    assert.equal(calls.length, 1);
    assert.equal(sockets.length, 1);
  });
});

describe('tickets', () => {
  test('no two attempts send the same ticket', async () => {
    const { clock, connection, calls, sockets } = setup({
      handler: (call, n) => (n % 4 === 0 ? 'network' : undefined),
      behaviour: (socket) => {
        const n = sockets.length;
        if (n % 3 === 0) socket.serverReject(4503, { error: 'store_unavailable', retry_after: 1 });
        else if (n % 3 === 1) socket.serverClose(1006);
        else {
          socket.serverAccept();
          socket.serverClose(1001, 'away');
        }
      },
    });
    await clock.runUntil(() => sockets.length >= 20);
    connection.close();
    const sent = sockets.map((socket) => socket.ticket);
    assert.equal(new Set(sent).size, sent.length, 'a ticket was sent twice');
    const issued = calls.map((call) => call.ticket).filter(Boolean);
    assert.deepEqual(sent, issued, 'each socket used the ticket of its own request');
  });

  test('a repeated ticket from the endpoint is refused', async () => {
    const { clock, connection, errors, sockets } = setup({
      handler: () => ({ ticket: 'SameTicketEveryTime0123456789abc' }),
      behaviour: (socket) => socket.serverClose(1006),
    });
    await clock.runUntil(() => errors().length === 2);
    assert.equal(sockets.length, 1, 'the repeated ticket was not sent');
    assert.equal(errors()[1].kind, 'ticket_rejected');
    assert.equal(errors()[1].code, 'ticket_already_used');
    assert.equal(errors()[1].willRetry, false);
    assert.equal(connection.state, 'closed');
  });
});

describe('tabs', () => {
  /** Two connections sharing one fake BroadcastChannel and one clock. */
  function twoTabs({ handler, behaviour, tokens } = {}) {
    const clock = new FakeClock();
    const bus = fakeBroadcastChannel();
    let draw = 0;
    const random = () => [0.1, 0.7, 0.4][draw++ % 3];
    const a = setup({ handler, behaviour, tokens, channel: bus.BroadcastChannel, options: { clock }, random });
    const b = setup({ handler, behaviour, tokens, channel: bus.BroadcastChannel, options: { clock }, random });
    return { clock, a, b, bus };
  }

  test('share one token refresh on 4401', async () => {
    let refreshes = 0;
    const refreshed = new Set();
    const clock = new FakeClock();
    const bus = fakeBroadcastChannel();
    const tabs = [];
    for (let i = 0; i < 3; i++) {
      const endpoint = fakeFetch();
      const server = fakeWebSocket((socket) => socket.serverAccept());
      const connection = connect(TICKET_URL, WS_URL, async ({ refresh }) => {
        if (!refresh) return TOKEN;
        refreshes += 1;
        return REFRESHED;
      }, { ...LIMITS, fetch: endpoint.fetch, WebSocket: server.WebSocket, BroadcastChannel: bus.BroadcastChannel, now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout });
      tabs.push({ connection, endpoint, server });
    }
    await clock.runUntil(() => tabs.every((tab) => tab.connection.state === 'open'));
    // The server closes every tab's connection at once, as --close-on-token-expiry does.
    for (const tab of tabs) tab.server.sockets[0].serverClose(4401, JSON.stringify({ error: 'token_expired' }));
    await clock.runUntil(() => tabs.every((tab) => tab.server.sockets.length === 2 && tab.connection.state === 'open'));
    for (const tab of tabs) {
      refreshed.add(tab.endpoint.calls[1].authorization);
      tab.connection.close();
    }
    assert.equal(refreshes, 1, 'getToken({refresh: true}) ran in one tab only');
    assert.deepEqual([...refreshed], [`Bearer ${REFRESHED}`]);
  });

  test('a refresh shared by another tab is reused', async () => {
    const { clock, a, b } = twoTabs({ tokens: [TOKEN, REFRESHED] });
    await clock.runUntil(() => a.connection.state === 'open' && b.connection.state === 'open');
    a.sockets[0].serverClose(4401, JSON.stringify({ error: 'token_expired' }));
    await clock.runUntil(() => a.sockets.length === 2 && a.connection.state === 'open');
    await clock.advance(1_000);
    b.sockets[0].serverClose(4401, JSON.stringify({ error: 'token_expired' }));
    await clock.runUntil(() => b.sockets.length === 2 && b.connection.state === 'open');
    assert.equal(a.tokenCalls.filter((c) => c.refresh).length, 1);
    assert.equal(b.tokenCalls.filter((c) => c.refresh).length, 0, 'the second tab took the shared token');
    assert.equal(b.calls[1].authorization, `Bearer ${REFRESHED}`);
    a.connection.close();
    b.connection.close();
  });

  test('share one back-off schedule while the server is down', async () => {
    let down = true;
    const handler = () => (down ? 'network' : undefined);
    const single = setup({ handler, random: () => 0 });
    await single.clock.advance(10_000);
    const singleAttempts = single.calls.length;
    single.connection.close();

    const { clock, a, b } = twoTabs({ handler });
    await clock.advance(10_000);
    const sharedAttempts = a.calls.length + b.calls.length;
    assert.ok(sharedAttempts <= singleAttempts + 3, `two tabs made ${sharedAttempts} requests; one tab alone makes ${singleAttempts}`);

    down = false;
    await clock.runUntil(() => a.connection.state === 'open' && b.connection.state === 'open');
    a.connection.close();
    b.connection.close();
  });

  test('a tab that gets through wakes the waiting tabs', async () => {
    let down = true;
    const { clock, a, b } = twoTabs({ handler: () => (down ? 'network' : undefined) });
    await clock.advance(5_000);
    down = false;
    await clock.runUntil(() => a.connection.state === 'open' || b.connection.state === 'open');
    const firstOpen = clock.now();
    await clock.runUntil(() => a.connection.state === 'open' && b.connection.state === 'open');
    assert.ok(clock.now() - firstOpen <= LIMITS.initialDelayMs, `second tab waited ${clock.now() - firstOpen} ms`);
    a.connection.close();
    b.connection.close();
  });
});

test('nothing is written to the console', async () => {
  await settle();
  assert.deepEqual(consoleCalls, []);
});
