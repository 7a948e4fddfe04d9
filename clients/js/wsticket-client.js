/**
 * Browser client of wsticket: trades the page's JWT for a single-use ticket
 * and opens the WebSocket with it, reconnecting with a fresh ticket each time.
 *
 * Every connection attempt requests a new ticket, and the client also refuses
 * a ticket it has sent before, so a ticket never travels twice even when a
 * cache or proxy repeats an old response. Failures reach the page as a
 * `WsTicketError` whose `kind` names the next step: log in again (`auth`), give
 * up (`forbidden`, `ticket_rejected`), or wait while the client retries
 * (`rate_limited`, `unavailable`). Tabs of one page coordinate over a
 * BroadcastChannel so that they share one token refresh and one back-off
 * schedule. The module has no console output at all, so it cannot log a
 * ticket or a token.
 *
 * No dependencies, no build step: the wsticket binary serves this file at
 * `GET /client.js`.
 */

/** The error kinds, in the order of the contract. */
export const ERROR_KINDS = Object.freeze([
  'auth',
  'forbidden',
  'rate_limited',
  'unavailable',
  'ticket_rejected',
]);

/** Default limits; every one can be set per connection. */
export const DEFAULTS = Object.freeze({
  initialDelayMs: 500,
  maxDelayMs: 30_000,
  factor: 2,
  /** Fraction of each delay that is random: 0.5 gives delays in [d/2, d]. */
  jitter: 0.5,
  /** Failed attempts in a row before the client gives up. */
  maxRetries: Infinity,
  ticketTimeoutMs: 10_000,
  openTimeoutMs: 10_000,
  /** How long a token refreshed by another tab is taken instead of refreshing again. */
  sharedTokenMaxAgeMs: 10_000,
  /** How long a tab waits for another tab's refresh before refreshing itself. */
  refreshWaitMs: 10_000,
  /** Pause after a refresh claim, so that two tabs claiming at once agree on one. */
  claimSettleMs: 30,
});

/** How many sent tickets a connection remembers to refuse repeats. */
const REMEMBERED_TICKETS = 100;

/** A failure, typed by what the page should do about it. */
export class WsTicketError extends Error {
  /**
   * @param {string} kind one of ERROR_KINDS
   * @param {string} message a sentence for people; never contains a ticket or a token
   * @param {object} [details]
   */
  constructor(kind, message, details = {}) {
    super(message);
    this.name = 'WsTicketError';
    this.kind = kind;
    /** The server's `error` code, such as `token_expired`, when it sent one. */
    this.code = details.code ?? null;
    /** HTTP status of the ticket endpoint, or null. */
    this.status = details.status ?? null;
    /** WebSocket close code, or null. */
    this.closeCode = details.closeCode ?? null;
    /** Delay the server asked for, in milliseconds, or null. */
    this.retryAfterMs = details.retryAfterMs ?? null;
    /** Whether the client tries again by itself. */
    this.willRetry = details.willRetry ?? false;
  }
}

/**
 * Computes the delay before retry number `attempt` (1 for the first retry):
 * `initialDelayMs * factor^(attempt-1)` capped at `maxDelayMs`, of which the
 * fraction `jitter` is random. The result, rounded to whole milliseconds, lies
 * in `[d * (1 - jitter), d]`.
 */
export function backoffDelay(attempt, limits = DEFAULTS, random = Math.random) {
  const exponent = Math.max(0, attempt - 1);
  const ceiling = Math.min(limits.maxDelayMs, limits.initialDelayMs * limits.factor ** exponent);
  return Math.round(ceiling * (1 - limits.jitter * random()));
}

/**
 * Parses a `Retry-After` value (seconds or an HTTP date) into milliseconds.
 * Returns null when the value is missing or malformed.
 */
export function parseRetryAfter(value, now = Date.now()) {
  if (value == null || value === '') return null;
  const text = String(value).trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  if (Number.isNaN(date)) return null;
  return Math.max(0, date - now);
}

/**
 * Opens a WebSocket authenticated by a ticket and keeps it open.
 *
 * @param {string} ticketUrl URL of `POST /websocket/ticket`
 * @param {string} webSocketUrl URL of `/ws`; `ws:`, `wss:`, or relative to the page
 * @param {(context: {refresh: boolean}) => Promise<string>} getToken returns the
 *   current JWT; `refresh: true` means the server rejected the last one as
 *   expired, so a new one is needed
 * @param {object} [options] limits from DEFAULTS, plus `protocols`,
 *   `binaryType`, `channelName`, and `fetch`, `WebSocket`, `BroadcastChannel`
 *   (`null` turns tab sharing off) to replace the globals
 * @returns {WsTicketConnection}
 */
export function connect(ticketUrl, webSocketUrl, getToken, options = {}) {
  return new WsTicketConnection(ticketUrl, webSocketUrl, getToken, options);
}

/** Standard close codes after which the client stops: 1008 is the usual policy-violation close. */
const STOP_CLOSE_CODES = new Set([1008]);

/** Resolves a possibly relative URL against the page, if there is one. */
function absoluteUrl(url, webSocket) {
  const base = globalThis.location?.href;
  const resolved = base ? new URL(url, base) : new URL(url);
  if (webSocket && resolved.protocol === 'http:') resolved.protocol = 'ws:';
  if (webSocket && resolved.protocol === 'https:') resolved.protocol = 'wss:';
  return resolved;
}

/**
 * Parses a close reason: `{"error": "...", "retry_after": n}`, or a bare code
 * such as `token_expired`. Other text gives nulls.
 */
function parseCloseReason(reason) {
  if (/^[a-z][a-z0-9_]*$/.test(reason)) return { code: reason, retryAfterMs: null };
  try {
    const body = JSON.parse(reason);
    if (body && typeof body === 'object') {
      const retryAfter = Number(body.retry_after);
      return {
        code: typeof body.error === 'string' ? body.error : null,
        retryAfterMs: Number.isFinite(retryAfter) && retryAfter >= 0 ? retryAfter * 1000 : null,
      };
    }
  } catch {
    // A reason that is not JSON carries no code.
  }
  return { code: null, retryAfterMs: null };
}

function randomId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

/**
 * One logical connection: a WebSocket that is reopened with a new ticket
 * after each drop until `close()` or a failure that retrying cannot fix.
 */
export class WsTicketConnection {
  #ticketUrl;
  #webSocketUrl;
  #getToken;
  #limits;
  #env;
  #listeners = { open: new Set(), message: new Set(), close: new Set(), error: new Set() };

  #state = 'connecting';
  #socket = null;
  /** Resolves the pending `#openSocket` promise when `close()` drops the socket. */
  #socketDone = null;
  #abort = null;
  #failures = 0;
  /** Tickets this connection has sent; a repeat is refused. */
  #sentTickets = new Set();
  /** The token of the last attempt, so a refresh can tell a new token from it. */
  #lastToken = null;
  #wake = null;
  #timer = null;
  #wakeAt = 0;
  #waitingOnProbe = false;
  #tabs = null;

  /** Handlers set as properties, like WebSocket's. */
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;

  constructor(ticketUrl, webSocketUrl, getToken, options = {}) {
    if (typeof getToken !== 'function') {
      throw new TypeError('getToken must be a function that returns the JWT as a promise');
    }
    this.#ticketUrl = absoluteUrl(ticketUrl, false).href;
    this.#webSocketUrl = absoluteUrl(webSocketUrl, true);
    this.#getToken = getToken;
    this.#limits = { ...DEFAULTS };
    for (const key of Object.keys(DEFAULTS)) {
      if (options[key] !== undefined) this.#limits[key] = options[key];
    }
    this.#env = {
      fetch: options.fetch ?? globalThis.fetch?.bind(globalThis),
      WebSocket: options.WebSocket ?? globalThis.WebSocket,
      random: options.random ?? Math.random,
      now: options.now ?? Date.now,
      setTimeout: options.setTimeout ?? globalThis.setTimeout.bind(globalThis),
      clearTimeout: options.clearTimeout ?? globalThis.clearTimeout.bind(globalThis),
      protocols: options.protocols,
      binaryType: options.binaryType,
    };
    const Channel = options.BroadcastChannel === undefined ? globalThis.BroadcastChannel : options.BroadcastChannel;
    if (Channel) {
      const name = options.channelName ?? `wsticket:${this.#ticketUrl}`;
      this.#tabs = new TabCoordinator(new Channel(name), this.#limits, this.#env, (message) => this.#onTabMessage(message));
    }
    // Start after the caller has had a chance to set handlers.
    this.#env.setTimeout(() => this.#run(), 0);
  }

  /** `connecting`, `open`, `waiting` (between attempts) or `closed`. */
  get state() {
    return this.#state;
  }

  /**
   * Sends data on the open WebSocket. Returns false, and sends nothing, while
   * no socket is open: messages are not queued across reconnects.
   */
  send(data) {
    if (this.#state !== 'open' || !this.#socket) return false;
    this.#socket.send(data);
    return true;
  }

  /** Closes the connection for good; no reconnect follows. */
  close(code = 1000, reason = '') {
    if (this.#state === 'closed') return;
    this.#state = 'closed';
    this.#abort?.abort();
    if (this.#timer !== null) this.#env.clearTimeout(this.#timer);
    this.#wake?.();
    const socket = this.#socket;
    this.#socket = null;
    if (socket) {
      socket.onclose = null;
      socket.close(code, reason);
      this.#socketDone?.({});
      this.#emit('close', { type: 'close', code, reason, wasClean: true, willReconnect: false, delayMs: null });
    }
    this.#tabs?.close();
  }

  addEventListener(type, listener) {
    this.#listeners[type]?.add(listener);
  }

  removeEventListener(type, listener) {
    this.#listeners[type]?.delete(listener);
  }

  #emit(type, event) {
    const handlers = [this[`on${type}`], ...this.#listeners[type]];
    for (const handler of handlers) {
      if (typeof handler !== 'function') continue;
      try {
        handler.call(this, event);
      } catch (err) {
        // A failing page handler must not stop the reconnect loop.
        if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
      }
    }
  }

  get #stopped() {
    return this.#state === 'closed';
  }

  /** The reconnect loop: one attempt, then a decision, until stopped. */
  async #run() {
    let refresh = false;
    let refreshUsed = false;
    while (!this.#stopped) {
      this.#state = 'connecting';
      const outcome = await this.#attempt(refresh);
      if (this.#stopped) return;

      if (outcome.established) {
        this.#failures = 0;
        refreshUsed = false;
      }
      if (outcome.retry === 'refresh' && !refreshUsed) {
        // Refresh and retry once, at once: the server rejected the JWT, not the network.
        refresh = true;
        refreshUsed = true;
        if (outcome.closeEvent) this.#emitClose(outcome.closeEvent, true, 0);
        continue;
      }
      refresh = false;

      const error = this.#errorOf(outcome, refreshUsed);
      if (!error.willRetry) {
        this.#state = 'closed';
        if (outcome.closeEvent) this.#emitClose(outcome.closeEvent, false, null);
        this.#emit('error', error);
        this.#tabs?.close();
        return;
      }

      this.#failures += 1;
      const delayMs = this.#delayFor(outcome);
      if (outcome.closeEvent) this.#emitClose(outcome.closeEvent, true, delayMs);
      this.#emit('error', error);
      await this.#waitUntil(this.#env.now() + delayMs, true);
    }
  }

  #emitClose(event, willReconnect, delayMs) {
    this.#emit('close', {
      type: 'close',
      code: event.code,
      reason: event.reason,
      wasClean: event.wasClean,
      willReconnect,
      delayMs,
    });
  }

  /** Turns an attempt's outcome into the error the page receives, with `willRetry` set. */
  #errorOf(outcome, refreshUsed) {
    let kind = outcome.kind;
    let willRetry = outcome.retry === 'backoff' || outcome.retry === 'after';
    if (outcome.retry === 'refresh' && refreshUsed) {
      // The retry with a refreshed JWT was rejected too: the person must log in again.
      kind = 'auth';
      willRetry = false;
    }
    if (willRetry && this.#failures + 1 > this.#limits.maxRetries) willRetry = false;
    return new WsTicketError(kind, outcome.message, {
      code: outcome.code,
      status: outcome.status,
      closeCode: outcome.closeEvent?.code,
      retryAfterMs: outcome.retryAfterMs,
      willRetry,
    });
  }

  #delayFor(outcome) {
    const backoff = backoffDelay(this.#failures, this.#limits, this.#env.random);
    const shared = this.#tabs?.sharedBackoff() ?? null;
    let delayMs = outcome.retryAfterMs != null ? Math.max(outcome.retryAfterMs, 0) : backoff;
    if (outcome.retry === 'backoff' && outcome.retryAfterMs != null) delayMs = Math.max(delayMs, backoff);
    if (shared) {
      this.#failures = Math.max(this.#failures, shared.failures);
      delayMs = Math.max(delayMs, shared.notBefore - this.#env.now());
    }
    this.#tabs?.announceBackoff(this.#failures, this.#env.now() + delayMs);
    return delayMs;
  }

  /**
   * Sleeps until `time`. Another tab may move the time later (its back-off)
   * or earlier (it reconnected), through `#reschedule`.
   */
  #waitUntil(time, waiting) {
    if (this.#stopped) return Promise.resolve();
    if (waiting) this.#state = 'waiting';
    return new Promise((resolve) => {
      this.#wake = () => {
        this.#wake = null;
        this.#timer = null;
        resolve();
      };
      this.#arm(time);
    }).then(async () => {
      // Another tab is probing the server: wait for its result instead of piling on.
      const probeEnd = this.#tabs?.probeInFlightUntil() ?? 0;
      if (!this.#stopped && probeEnd > this.#env.now()) {
        this.#waitingOnProbe = true;
        await this.#waitUntil(probeEnd, waiting);
        this.#waitingOnProbe = false;
      }
    });
  }

  #arm(time) {
    if (this.#timer !== null) this.#env.clearTimeout(this.#timer);
    this.#wakeAt = time;
    const wake = this.#wake;
    this.#timer = this.#env.setTimeout(() => wake?.(), Math.max(0, time - this.#env.now()));
  }

  #reschedule(time) {
    if (this.#state !== 'waiting' || !this.#wake) return;
    this.#arm(time);
  }

  #onTabMessage(message) {
    if (message.type === 'backoff') {
      if (this.#state === 'waiting' && message.notBefore > this.#wakeAt) {
        this.#failures = Math.max(this.#failures, message.failures);
        // Follow the shared schedule, staggered so tabs do not all wake together.
        this.#reschedule(message.notBefore + this.#stagger());
      }
    } else if (message.type === 'up') {
      if (this.#state === 'waiting') {
        this.#failures = 0;
        this.#reschedule(Math.min(this.#wakeAt, this.#env.now() + this.#stagger()));
      }
    } else if (message.type === 'probe-end') {
      if (this.#state === 'waiting' && this.#waitingOnProbe) {
        this.#reschedule(Math.min(this.#wakeAt, this.#env.now() + this.#stagger()));
      }
    }
  }

  #stagger() {
    return Math.round(this.#env.random() * this.#limits.initialDelayMs);
  }

  /** One attempt: token, ticket, WebSocket. Resolves when the socket ends or a step fails. */
  async #attempt(refresh) {
    this.#tabs?.announceProbe(this.#limits.ticketTimeoutMs + this.#limits.openTimeoutMs);
    let token;
    try {
      token = refresh ? await this.#refreshedToken() : await this.#getToken({ refresh: false });
    } catch (err) {
      const kind = ERROR_KINDS.includes(err?.kind) ? err.kind : 'auth';
      return {
        kind,
        code: err?.code ?? 'token_unavailable',
        retry: kind === 'unavailable' ? 'backoff' : 'no',
        message: 'getToken() failed, so no ticket could be requested.',
      };
    }
    if (this.#stopped) return {};
    if (typeof token !== 'string' || token === '') {
      return { kind: 'auth', code: 'token_unavailable', retry: 'no', message: 'getToken() returned no token.' };
    }
    this.#lastToken = token;

    const ticket = await this.#requestTicket(token);
    if (this.#stopped || ticket.kind) return ticket;
    if (this.#sentTickets.has(ticket.ticket)) {
      return {
        kind: 'ticket_rejected',
        code: 'ticket_already_used',
        retry: 'no',
        message: 'The ticket endpoint returned a ticket this client already used; a cache or proxy may be repeating responses.',
      };
    }
    this.#sentTickets.add(ticket.ticket);
    if (this.#sentTickets.size > REMEMBERED_TICKETS) {
      this.#sentTickets.delete(this.#sentTickets.values().next().value);
    }
    return this.#openSocket(ticket.ticket);
  }

  async #refreshedToken() {
    const rejected = this.#lastToken;
    if (this.#tabs) return this.#tabs.refresh(rejected, () => this.#getToken({ refresh: true }));
    return this.#getToken({ refresh: true });
  }

  /** POSTs the token to the ticket endpoint; returns `{ticket}` or a failed outcome. */
  async #requestTicket(token) {
    const abort = new AbortController();
    this.#abort = abort;
    const timer = this.#env.setTimeout(() => abort.abort(), this.#limits.ticketTimeoutMs);
    let response;
    let body = null;
    try {
      response = await this.#env.fetch(this.#ticketUrl, {
        method: 'POST',
        headers: { Authorization: `Bearer ${token}` },
        cache: 'no-store',
        signal: abort.signal,
      });
      body = await response.json().catch(() => null);
    } catch {
      // The browser hides why a fetch failed: no network, server down, CORS
      // rejected or timed out all look the same here.
      return {
        kind: 'unavailable',
        code: 'network_error',
        retry: 'backoff',
        message: 'The ticket endpoint could not be reached.',
      };
    } finally {
      this.#env.clearTimeout(timer);
      this.#abort = null;
    }

    const status = response.status;
    const code = body && typeof body.error === 'string' ? body.error : null;
    const serverMessage = body && typeof body.message === 'string' ? body.message : null;
    if (status === 200) {
      const ticket = body?.ticket;
      if (typeof ticket === 'string' && /^[A-Za-z0-9_-]{16,128}$/.test(ticket)) return { ticket };
      return { kind: 'unavailable', code: 'invalid_response', status, retry: 'backoff', message: 'The ticket endpoint returned 200 without a ticket.' };
    }
    const retryAfterMs = parseRetryAfter(response.headers?.get?.('retry-after'), this.#env.now());
    const failure = { code, status, retryAfterMs, message: serverMessage ?? `The ticket endpoint returned HTTP ${status}.` };
    if (status === 401) {
      const retry = code === 'token_expired' ? 'refresh' : 'no';
      return { ...failure, kind: 'auth', retry };
    }
    if (status === 403) return { ...failure, kind: 'forbidden', retry: 'no' };
    if (status === 429) return { ...failure, kind: 'rate_limited', retry: 'after' };
    return { ...failure, kind: 'unavailable', retry: 'backoff' };
  }

  /** Opens the WebSocket with a ticket and resolves when it closes. */
  #openSocket(ticket) {
    const url = new URL(this.#webSocketUrl.href);
    url.searchParams.set('ticket', ticket);
    return new Promise((resolve) => {
      this.#socketDone = resolve;
      let socket;
      try {
        socket = new this.#env.WebSocket(url.href, this.#env.protocols);
      } catch {
        resolve({ kind: 'unavailable', code: 'websocket_failed', retry: 'backoff', message: 'The WebSocket could not be created.' });
        return;
      }
      if (this.#env.binaryType) socket.binaryType = this.#env.binaryType;
      this.#socket = socket;
      let opened = false;
      // In wsticket's close mode a refused upgrade opens and closes at once
      // with a 4xxx code, while an accepted one starts with the server's
      // greeting. So the first message, not the open, marks success.
      let established = false;
      const openTimer = this.#env.setTimeout(() => {
        if (!opened) socket.close();
      }, this.#limits.openTimeoutMs);

      socket.onopen = () => {
        opened = true;
        this.#env.clearTimeout(openTimer);
        if (this.#stopped) return;
        this.#state = 'open';
        this.#emit('open', { type: 'open' });
      };
      socket.onmessage = (event) => {
        if (this.#stopped) return;
        if (!established) {
          established = true;
          this.#tabs?.announceUp();
        }
        this.#emit('message', { type: 'message', data: event.data });
      };
      socket.onerror = () => {
        // The close event that follows carries the code; nothing to do here.
      };
      socket.onclose = (event) => {
        this.#env.clearTimeout(openTimer);
        this.#socket = null;
        const closeEvent = { code: event.code, reason: event.reason ?? '', wasClean: event.wasClean ?? false };
        resolve({ ...classifyClose(closeEvent, opened), established, closeEvent });
      };
    });
  }
}

/** Classifies how a WebSocket closed: 4000 + HTTP status from wsticket, or a standard code. */
function classifyClose(event, opened) {
  const { code: errorCode, retryAfterMs } = parseCloseReason(event.reason);
  const details = { code: errorCode, retryAfterMs };
  const code = event.code;
  if (code === 4401) {
    return { ...details, kind: 'auth', retry: 'refresh', message: 'The server rejected the connection as unauthenticated.' };
  }
  if (code === 4403) {
    const kind = errorCode === 'origin_not_allowed' ? 'forbidden' : 'ticket_rejected';
    return { ...details, kind, retry: 'no', message: 'The server rejected the connection.' };
  }
  if (code === 4429) {
    return { ...details, kind: 'rate_limited', retry: 'after', message: 'Too many connection attempts; waiting as the server asked.' };
  }
  if (code >= 4500 && code <= 4599) {
    return { ...details, kind: 'unavailable', retry: 'backoff', message: 'The server or its upstream is unavailable.' };
  }
  if (code >= 4000 && code <= 4499) {
    return { ...details, kind: 'ticket_rejected', retry: 'no', message: `The server rejected the connection (close code ${code}).` };
  }
  if (STOP_CLOSE_CODES.has(code)) {
    return { ...details, kind: 'ticket_rejected', retry: 'no', message: 'The server closed the connection for a policy violation.' };
  }
  const message = opened
    ? 'The connection dropped; reconnecting with a new ticket.'
    : 'The WebSocket could not be opened; the server may be down or may have rejected the ticket.';
  return { ...details, kind: 'unavailable', retry: 'backoff', message };
}

/**
 * Coordination between tabs of one page over a BroadcastChannel. The tabs run
 * one token refresh at a time and follow one back-off schedule, in which one
 * tab probes the server while the others wait. A tab that gets through notifies
 * the others with a message, so they reconnect promptly.
 *
 * Messages carry wall-clock times (`Date.now()`), which all tabs share. The
 * refreshed JWT is posted on the channel: a BroadcastChannel only reaches
 * same-origin contexts of the same browser profile, which can already read
 * the page's storage.
 */
class TabCoordinator {
  #channel;
  #limits;
  #env;
  #onMessage;
  #id = randomId();
  #sharedToken = null;
  #claims = new Map();
  #waiters = new Set();
  #backoff = null;
  #probeUntil = 0;

  constructor(channel, limits, env, onMessage) {
    this.#channel = channel;
    this.#limits = limits;
    this.#env = env;
    this.#onMessage = onMessage;
    channel.onmessage = (event) => this.#receive(event.data);
  }

  /** Leaves the channel; tabs waiting on this tab's probe stop waiting. */
  close() {
    this.#post({ type: 'probe-end' });
    this.#channel.close();
  }

  #post(message) {
    try {
      this.#channel.postMessage({ ...message, from: this.#id });
    } catch {
      // A closed channel only loses the coordination, not the connection.
    }
  }

  #receive(message) {
    if (!message || typeof message !== 'object' || message.from === this.#id) return;
    const now = this.#env.now();
    switch (message.type) {
      case 'refresh-claim':
        this.#claims.set(message.from, now);
        break;
      case 'refresh-done':
        // Without a token: the refresh failed or the tab gave way to another.
        this.#claims.delete(message.from);
        if (typeof message.token === 'string') {
          this.#sharedToken = { token: message.token, at: now };
        }
        for (const waiter of this.#waiters) waiter(message);
        break;
      case 'backoff':
        this.#backoff = { failures: message.failures, notBefore: message.notBefore };
        this.#probeUntil = 0;
        break;
      case 'probe':
        this.#probeUntil = Math.max(this.#probeUntil, message.until);
        break;
      case 'probe-end':
        this.#probeUntil = 0;
        break;
      case 'up':
        this.#backoff = null;
        this.#probeUntil = 0;
        break;
      default:
        return;
    }
    this.#onMessage(message);
  }

  /** Returns the shared back-off state if it is still in force. */
  sharedBackoff() {
    if (!this.#backoff || this.#backoff.notBefore <= this.#env.now()) return null;
    return this.#backoff;
  }

  probeInFlightUntil() {
    return this.#probeUntil;
  }

  announceBackoff(failures, notBefore) {
    this.#backoff = { failures, notBefore };
    this.#post({ type: 'backoff', failures, notBefore });
  }

  announceProbe(durationMs) {
    this.#probeUntil = 0;
    this.#post({ type: 'probe', until: this.#env.now() + durationMs });
  }

  announceUp() {
    this.#backoff = null;
    this.#post({ type: 'up' });
  }

  #recentSharedToken(rejected) {
    const shared = this.#sharedToken;
    if (!shared || shared.token === rejected) return null;
    if (this.#env.now() - shared.at > this.#limits.sharedTokenMaxAgeMs) return null;
    return shared.token;
  }

  #liveClaims() {
    const now = this.#env.now();
    for (const [id, at] of this.#claims) {
      if (now - at > this.#limits.refreshWaitMs) this.#claims.delete(id);
    }
    return [...this.#claims.keys()];
  }

  /** Waits for another tab's refresh; resolves to its token or null. */
  #awaitOtherRefresh() {
    return new Promise((resolve) => {
      const finish = (token) => {
        this.#waiters.delete(waiter);
        this.#env.clearTimeout(timer);
        resolve(token);
      };
      const waiter = (message) => {
        // A tab that gave way is not the one refreshing; keep waiting for that one.
        if (typeof message.token !== 'string' && this.#liveClaims().length > 0) return;
        finish(typeof message.token === 'string' ? message.token : null);
      };
      const timer = this.#env.setTimeout(() => finish(null), this.#limits.refreshWaitMs);
      this.#waiters.add(waiter);
    });
  }

  /**
   * Returns a refreshed JWT: one that another tab refreshed recently, the
   * result of a refresh another tab is running, or this tab's own `refresh()`.
   */
  async refresh(rejected, refresh) {
    const shared = this.#recentSharedToken(rejected);
    if (shared) return shared;

    if (this.#liveClaims().length > 0) {
      const token = await this.#awaitOtherRefresh();
      if (token && token !== rejected) return token;
    }

    this.#post({ type: 'refresh-claim' });
    await new Promise((resolve) => this.#env.setTimeout(resolve, this.#limits.claimSettleMs));
    // A tab that claimed at the same time may already have finished.
    const sharedMeanwhile = this.#recentSharedToken(rejected);
    if (sharedMeanwhile) {
      this.#post({ type: 'refresh-done' });
      return sharedMeanwhile;
    }
    // Two tabs that claimed at once: the smaller id refreshes, the other waits.
    if (this.#liveClaims().some((id) => id < this.#id)) {
      this.#post({ type: 'refresh-done' });
      const token = await this.#awaitOtherRefresh();
      if (token && token !== rejected) return token;
    }

    try {
      const token = await refresh();
      this.#post({ type: 'refresh-done', token });
      return token;
    } catch (err) {
      this.#post({ type: 'refresh-done' });
      throw err;
    }
  }
}
