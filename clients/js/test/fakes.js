// Fakes of the browser APIs the client uses: a virtual clock, fetch,
// WebSocket and BroadcastChannel. Nothing here touches the network.

/** Lets pending promise chains run: several macrotask turns. */
export async function settle(turns = 20) {
  for (let i = 0; i < turns; i++) await new Promise((resolve) => setImmediate(resolve));
}

/**
 * Virtual time: `setTimeout` only records, and `runNext` jumps to the
 * earliest timer. Every requested delay is kept in `requested`.
 */
export class FakeClock {
  time = 1_700_000_000_000;
  timers = new Map();
  nextId = 1;
  requested = [];

  now = () => this.time;

  setTimeout = (fn, ms = 0) => {
    const id = this.nextId++;
    const delay = Math.max(0, ms);
    this.requested.push(delay);
    this.timers.set(id, { at: this.time + delay, fn });
    return id;
  };

  clearTimeout = (id) => {
    this.timers.delete(id);
  };

  /** Runs the earliest timer; returns false when none is pending. */
  async runNext() {
    await settle();
    if (this.timers.size === 0) return false;
    let earliest = null;
    for (const [id, timer] of this.timers) {
      if (!earliest || timer.at < earliest.timer.at) earliest = { id, timer };
    }
    this.timers.delete(earliest.id);
    this.time = Math.max(this.time, earliest.timer.at);
    earliest.timer.fn();
    await settle();
    return true;
  }

  /** Runs timers until `done()` is true; fails after `maxSteps` timers. */
  async runUntil(done, maxSteps = 500) {
    for (let step = 0; step < maxSteps; step++) {
      await settle();
      if (done()) return;
      if (!(await this.runNext())) break;
    }
    await settle();
    if (!done()) throw new Error('condition not reached within the step limit');
  }

  /** Runs every timer due up to `time + ms`. */
  async advance(ms, maxSteps = 500) {
    const end = this.time + ms;
    for (let step = 0; step < maxSteps; step++) {
      await settle();
      const due = [...this.timers.values()].some((timer) => timer.at <= end);
      if (!due) break;
      await this.runNext();
    }
    this.time = Math.max(this.time, end);
    await settle();
  }
}

let ticketCounter = 0;

/** Returns a new well-formed ticket: 32 characters of [A-Za-z0-9]. */
export function newTicket() {
  ticketCounter += 1;
  return `T${String(ticketCounter).padStart(8, '0')}${'x'.repeat(23)}`;
}

function response(status, body, headers = {}) {
  const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), String(v)]));
  return {
    status,
    ok: status >= 200 && status < 300,
    headers: { get: (name) => lower[name.toLowerCase()] ?? null },
    json: async () => {
      if (body === undefined) throw new SyntaxError('no JSON body');
      return body;
    },
  };
}

/**
 * Creates a fake ticket endpoint. `handler(call)` returns `{status, body, headers}`,
 * `'network'` for a failed fetch, or nothing for a new ticket.
 */
export function fakeFetch(handler = () => undefined) {
  const calls = [];
  const fetch = async (url, init = {}) => {
    const call = { url, method: init.method, authorization: init.headers?.Authorization, ticket: null };
    calls.push(call);
    const answer = handler(call, calls.length);
    if (answer === 'network') throw new TypeError('Failed to fetch');
    if (answer && answer.status !== undefined) {
      return response(answer.status, answer.body, answer.headers);
    }
    call.ticket = answer?.ticket ?? newTicket();
    return response(200, { ticket: call.ticket, expires_at: '2030-01-01T00:00:00Z', expires_in: 30 });
  };
  return { fetch, calls };
}

/**
 * Creates a WebSocket class whose server side is `behaviour(socket)`, called on the
 * next turn after construction. Every socket is kept in `sockets`.
 */
export function fakeWebSocket(behaviour = (socket) => socket.serverAccept()) {
  const sockets = [];
  class FakeWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSED = 3;

    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.onopen = null;
      this.onmessage = null;
      this.onclose = null;
      this.onerror = null;
      sockets.push(this);
      setImmediate(() => behaviour(this));
    }

    get ticket() {
      return new URL(this.url).searchParams.get('ticket');
    }

    send(data) {
      if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
      this.sent.push(data);
    }

    close(code = 1000, reason = '') {
      if (this.readyState === 3) return;
      const wasOpen = this.readyState === 1;
      this.readyState = 3;
      this.closedByClient = { code, reason };
      this.onclose?.({ code: wasOpen ? code : 1006, reason: wasOpen ? reason : '', wasClean: wasOpen });
    }

    serverOpen() {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.({});
    }

    /** Opens and sends a greeting, as wsticket does after a valid ticket. */
    serverAccept() {
      this.serverOpen();
      this.serverMessage('{"type":"authenticated","subject":"user-1"}');
    }

    serverMessage(data) {
      this.onmessage?.({ data });
    }

    /** Closes from the server side; before open with 1006, as a browser reports a refused upgrade. */
    serverClose(code, reason = '') {
      if (this.readyState === 3) return;
      if (this.readyState === 0 && code === 1006) this.onerror?.({});
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }

    /** Close-mode rejection: the upgrade succeeds and the server closes at once. */
    serverReject(code, body) {
      this.serverOpen();
      this.serverClose(code, JSON.stringify(body));
    }
  }
  return { WebSocket: FakeWebSocket, sockets };
}

/** BroadcastChannel whose instances of one name reach each other, never themselves. */
export function fakeBroadcastChannel() {
  const channels = new Map();
  const posted = [];
  class FakeBroadcastChannel {
    constructor(name) {
      this.name = name;
      this.onmessage = null;
      this.closed = false;
      if (!channels.has(name)) channels.set(name, new Set());
      channels.get(name).add(this);
    }

    postMessage(message) {
      if (this.closed) throw new Error('InvalidStateError: channel closed');
      const copy = structuredClone(message);
      posted.push(copy);
      for (const other of channels.get(this.name)) {
        if (other !== this && !other.closed) setImmediate(() => other.onmessage?.({ data: structuredClone(copy) }));
      }
    }

    close() {
      this.closed = true;
      channels.get(this.name).delete(this);
    }
  }
  return { BroadcastChannel: FakeBroadcastChannel, posted };
}
