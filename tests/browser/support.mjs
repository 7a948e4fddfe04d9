// Test support for the browser tests: an identity provider and page server
// in Node, the real wsticket binary, and headless Chromium. Everything
// listens on 127.0.0.1 only. Tokens and tickets stay in memory and are never
// printed; a failure message reports that one leaked, never its value.

import { spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { generateKeyPairSync, randomUUID, sign } from 'node:crypto';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = resolve(here, '../..');
export const OUTPUT_DIR = join(REPO_ROOT, 'target', 'browser-tests');
export const SCREENSHOT_DIR = join(REPO_ROOT, 'target', 'browser-screenshots');
export const WSTICKET_BIN =
  process.env.WSTICKET_BIN ?? join(resolve(REPO_ROOT, process.env.CARGO_TARGET_DIR ?? 'target'), 'debug', 'wsticket');
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

export const ISSUER = 'https://idp.browser-tests.invalid';
export const AUDIENCE = 'wsticket-browser-tests';
const KID = 'browser-tests-ed25519';

const PAGE_HTML = readFileSync(join(here, 'page.html'), 'utf8');

// Child processes still running when the runner exits (a timed-out test) are
// killed, so no wsticket or demo outlives the run.
const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

/** Registers a child process to be killed if the runner exits first. */
export function track(child) {
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

/** Polls `check` every 50 ms until it returns a truthy value or `timeoutMs` passes. */
export async function waitFor(what, check, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await check();
    if (value) return value;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

function base64url(data) {
  return Buffer.from(data).toString('base64url');
}

/**
 * An identity provider and page server on 127.0.0.1: it serves the JWKS of
 * an Ed25519 key, signs JWTs at `POST /token`, serves the test page, and
 * relays `POST /relay/ticket` to wsticket without an Origin header, the way
 * a page's own backend would.
 */
export class IdentityProvider {
  /** Lifetime of the next JWTs from `/token`, in seconds; negative ones are already expired. */
  tokenLifetime = 300;
  /** Every JWT signed, so tests can check none leaked. */
  issuedTokens = [];
  /** Set by the test: where `/relay/ticket` forwards to. */
  wsticketOrigin = null;

  #server;
  #privateKey;
  #jwk;

  static async start() {
    const provider = new IdentityProvider();
    await provider.#listen();
    return provider;
  }

  constructor() {
    const { publicKey, privateKey } = generateKeyPairSync('ed25519');
    this.#privateKey = privateKey;
    this.#jwk = { ...publicKey.export({ format: 'jwk' }), kid: KID, alg: 'EdDSA', use: 'sig' };
  }

  get port() {
    return this.#server.address().port;
  }

  /** Origin of the page as wsticket allows it. */
  get origin() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The same page server under a name that is a different origin. */
  get otherOrigin() {
    return `http://localhost:${this.port}`;
  }

  get jwksUrl() {
    return `${this.origin}/.well-known/jwks.json`;
  }

  /** Signs an EdDSA JWT for `subject` that expires `lifetime` seconds from now. */
  signToken(subject = 'browser-user', lifetime = this.tokenLifetime) {
    const now = Math.floor(Date.now() / 1000);
    const header = base64url(JSON.stringify({ alg: 'EdDSA', typ: 'JWT', kid: KID }));
    const claims = base64url(JSON.stringify({
      iss: ISSUER,
      aud: AUDIENCE,
      sub: subject,
      sid: randomUUID(),
      iat: now - 5,
      exp: now + lifetime,
    }));
    const signature = sign(null, Buffer.from(`${header}.${claims}`), this.#privateKey);
    const token = `${header}.${claims}.${base64url(signature)}`;
    this.issuedTokens.push(token);
    return token;
  }

  #listen() {
    this.#server = http.createServer((request, response) => this.#handle(request, response));
    return new Promise((resolve) => this.#server.listen(0, '127.0.0.1', resolve));
  }

  #handle(request, response) {
    const url = new URL(request.url, 'http://127.0.0.1');
    if (url.pathname === '/.well-known/jwks.json') {
      return send(response, 200, 'application/json', JSON.stringify({ keys: [this.#jwk] }));
    }
    if (url.pathname === '/page.html') {
      return send(response, 200, 'text/html; charset=utf-8', PAGE_HTML);
    }
    if (url.pathname === '/token' && request.method === 'POST') {
      const body = JSON.stringify({ token: this.signToken() });
      return send(response, 200, 'application/json', body, { 'cache-control': 'no-store' });
    }
    if (url.pathname === '/relay/ticket' && request.method === 'POST') {
      return this.#relay(request, response);
    }
    return send(response, 404, 'text/plain', 'not found');
  }

  #relay(request, response) {
    const target = new URL('/websocket/ticket', this.wsticketOrigin);
    const upstream = http.request(target, {
      method: 'POST',
      headers: { authorization: request.headers.authorization ?? '' },
    }, (answer) => {
      const headers = { 'content-type': answer.headers['content-type'] ?? 'application/json' };
      if (answer.headers['retry-after']) headers['retry-after'] = answer.headers['retry-after'];
      response.writeHead(answer.statusCode, headers);
      answer.pipe(response);
    });
    upstream.on('error', () => send(response, 502, 'application/json', '{"error":"relay_failed"}'));
    upstream.end();
  }

  close() {
    this.#server.closeAllConnections?.();
    return new Promise((resolve) => this.#server.close(resolve));
  }
}

function send(response, status, contentType, body, headers = {}) {
  response.writeHead(status, { 'content-type': contentType, ...headers });
  response.end(body);
}

/** Returns the flags of `wsticket serve --help`, to find out which options exist. */
export async function serveHelp() {
  return new Promise((resolve, reject) => {
    const child = spawn(WSTICKET_BIN, ['serve', '--help'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk) => { output += chunk; });
    child.on('error', reject);
    child.on('close', () => resolve(output));
  });
}

/**
 * The real wsticket binary on 127.0.0.1. Its output goes to a log file under
 * target/browser-tests/; wsticket logs hashed ticket ids, never tickets.
 */
export class Wsticket {
  public = null;
  admin = null;
  #child = null;
  #exited = null;
  #dataDir;
  #args;
  #logPath;

  /** Starts a server with `extraArgs` on ephemeral ports and waits until /readyz is 200. */
  static async start(provider, name, extraArgs = []) {
    const server = new Wsticket(provider, name, extraArgs);
    await server.#spawn('127.0.0.1:0');
    return server;
  }

  constructor(provider, name, extraArgs) {
    mkdirSync(OUTPUT_DIR, { recursive: true });
    this.#dataDir = mkdtempSync(join(tmpdir(), 'wsticket-browser-'));
    this.#logPath = join(OUTPUT_DIR, `${name}.wsticket.log`);
    this.#args = [
      '--admin-listen', '127.0.0.1:0',
      '--jwks-url', provider.jwksUrl,
      '--issuer', ISSUER,
      '--audience', AUDIENCE,
      '--algorithms', 'EdDSA',
      '--data-dir', join(this.#dataDir, 'store'),
      ...extraArgs,
    ];
  }

  get origin() {
    return `http://${this.public}`;
  }

  async #spawn(listen) {
    const log = createWriteStream(this.#logPath, { flags: 'a' });
    const child = track(spawn(WSTICKET_BIN, ['serve', '--listen', listen, ...this.#args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    }));
    this.#child = child;
    this.#exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    let buffered = '';
    const onData = (chunk) => {
      log.write(chunk);
      buffered += chunk;
      let newline;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        this.#readListening(line);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    const startedPublic = this.public;
    await waitFor('wsticket to listen', () => this.admin && this.public, 15_000).catch(async (err) => {
      throw new Error(`${err.message}; see ${this.#logPath}`);
    });
    if (startedPublic && startedPublic !== this.public) {
      throw new Error(`wsticket came back on ${this.public}, not ${startedPublic}`);
    }
    await waitFor('GET /readyz to return 200', () => this.#ready(), 15_000);
  }

  #readListening(line) {
    let event;
    try {
      event = JSON.parse(line);
    } catch {
      return;
    }
    const fields = event.fields ?? event;
    if (fields.event !== 'listening') return;
    if (fields.listener === 'public') this.public = fields.addr;
    if (fields.listener === 'admin') this.admin = fields.addr;
  }

  #ready() {
    return new Promise((resolve) => {
      const request = http.get(`http://${this.admin}/readyz`, (response) => {
        response.resume();
        resolve(response.statusCode === 200);
      });
      request.on('error', () => resolve(false));
      request.setTimeout(1_000, () => request.destroy());
    });
  }

  /** Stops the server with SIGTERM, which closes open WebSockets with 1001. */
  async stop() {
    if (!this.#child || this.#child.exitCode !== null || this.#child.signalCode !== null) return;
    this.#child.kill('SIGTERM');
    const timeout = new Promise((resolve) => setTimeout(() => resolve('timeout'), 40_000));
    if ((await Promise.race([this.#exited, timeout])) === 'timeout') {
      this.#child.kill('SIGKILL');
      await this.#exited;
    }
  }

  /** Stops the server and starts it again on the same ports and data directory. */
  async restart() {
    const listen = this.public;
    await this.stop();
    this.admin = null;
    await this.#spawn(listen);
  }

  async close() {
    await this.stop();
    rmSync(this.#dataDir, { recursive: true, force: true });
  }
}

/** Chromium flags: no sandbox (root in CI), and no calls to any outside service. */
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--headless',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--no-first-run',
  '--disable-sync',
];

/**
 * Launches Chromium with a fresh profile. Every console message of every page
 * is kept in `consoleMessages` so a test can check that no secret reached it.
 */
export async function launchBrowser() {
  const profile = mkdtempSync(join(tmpdir(), 'wsticket-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 900, height: 900 },
  });
  const consoleMessages = [];
  const pageErrors = [];
  const watch = (page) => {
    page.on('console', (message) => consoleMessages.push({ type: message.type(), text: message.text() }));
    page.on('pageerror', (error) => pageErrors.push(String(error)));
  };
  context.pages().forEach(watch);
  context.on('page', watch);
  return {
    context,
    consoleMessages,
    pageErrors,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/**
 * Opens the test page at `pageOrigin` and starts the client against
 * `server` with `options` (see page.html).
 */
export async function openTestPage(browser, pageOrigin, server, options = {}) {
  const page = await browser.context.newPage();
  await page.goto(`${pageOrigin}/page.html`);
  await page.waitForFunction(() => typeof window.startClient === 'function', null, { timeout: 10_000 });
  await page.evaluate(([origin, opts]) => window.startClient(origin, opts), [server.origin, options]);
  return page;
}

/** Returns the page's record of what the client did (see page.html). */
export function pageState(page) {
  return page.evaluate(() => window.e2e.summary());
}

/**
 * Checks that no console message contains a token or a ticket. Chromium's
 * own "WebSocket connection to '…' failed" lines contain the URL with the
 * ticket and are counted apart, because no page code can stop them.
 */
export async function assertNoSecretsInConsole(browser, provider, pages) {
  const tickets = [];
  for (const page of pages) {
    tickets.push(...(await page.evaluate(() => [...window.e2e.tickets])));
  }
  let browserNetworkLines = 0;
  browser.consoleMessages.forEach((message, index) => {
    for (const token of provider.issuedTokens) {
      if (message.text.includes(token)) throw new Error(`console message ${index} contains a JWT`);
    }
    const hasTicket = tickets.some((ticket) => message.text.includes(ticket));
    if (!hasTicket) return;
    if (message.text.startsWith('WebSocket connection to ')) {
      browserNetworkLines += 1;
      return;
    }
    throw new Error(`console message ${index} (${message.type}) contains a ticket`);
  });
  return browserNetworkLines;
}
