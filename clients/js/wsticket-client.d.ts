/** What the page should do about a failure. */
export type ErrorKind =
  /** The JWT was rejected: log in again. */
  | 'auth'
  /** The server refuses this page or user (403): stop. */
  | 'forbidden'
  /** Too many requests: the client waits as the server asked, then retries. */
  | 'rate_limited'
  /** Server down, network failure or 5xx: the client retries with back-off. */
  | 'unavailable'
  /** The upgrade refused the ticket (used, unknown, malformed): stop. */
  | 'ticket_rejected';

export declare const ERROR_KINDS: readonly ErrorKind[];

/** Reconnect and timeout limits; every field is optional in ConnectOptions. */
export interface Limits {
  /** Delay before the first retry, in milliseconds. Default 500. */
  initialDelayMs: number;
  /** Maximum delay between retries, in milliseconds. Default 30000. */
  maxDelayMs: number;
  /** Growth of the delay per failed attempt. Default 2. */
  factor: number;
  /** Random fraction of each delay, 0 to 1: a delay d becomes a value in [d * (1 - jitter), d]. Default 0.5. */
  jitter: number;
  /** Failed attempts in a row before the client gives up. Default Infinity. */
  maxRetries: number;
  /** Timeout of one ticket request, in milliseconds. Default 10000. */
  ticketTimeoutMs: number;
  /** Time a WebSocket may take to open, in milliseconds. Default 10000. */
  openTimeoutMs: number;
  /** Age up to which a JWT refreshed by another tab is used instead of refreshing again, in milliseconds. Default 10000. */
  sharedTokenMaxAgeMs: number;
  /** Maximum wait for another tab's refresh, in milliseconds. Default 10000. */
  refreshWaitMs: number;
  /** Pause after announcing a refresh, so two tabs announcing at once agree on one, in milliseconds. Default 30. */
  claimSettleMs: number;
}

export declare const DEFAULTS: Readonly<Limits>;

export interface ConnectOptions extends Partial<Limits> {
  /** WebSocket subprotocols. */
  protocols?: string | string[];
  /** `binaryType` of each WebSocket. */
  binaryType?: BinaryType;
  /** BroadcastChannel name shared by the tabs; default `wsticket:` + the ticket URL. */
  channelName?: string;
  /** Replaces the global `fetch`, for example to add headers or in tests. */
  fetch?: typeof fetch;
  /** Replaces the global `WebSocket`. */
  WebSocket?: typeof WebSocket;
  /** Replaces the global `BroadcastChannel`; `null` turns coordination between tabs off. */
  BroadcastChannel?: typeof BroadcastChannel | null;
}

export interface TokenContext {
  /** True when the server rejected the last JWT as expired: return a new one. */
  refresh: boolean;
}

export declare class WsTicketError extends Error {
  constructor(kind: ErrorKind, message: string, details?: Partial<Pick<WsTicketError, 'code' | 'status' | 'closeCode' | 'retryAfterMs' | 'willRetry'>>);
  readonly name: 'WsTicketError';
  readonly kind: ErrorKind;
  /** The server's `error` code, such as `token_expired` or `ticket_already_used`. */
  readonly code: string | null;
  /** HTTP status of the ticket endpoint. */
  readonly status: number | null;
  /** WebSocket close code. */
  readonly closeCode: number | null;
  /** Delay the server asked for, in milliseconds. */
  readonly retryAfterMs: number | null;
  /** Whether the client tries again by itself. */
  readonly willRetry: boolean;
}

export interface OpenEvent {
  type: 'open';
}

export interface MessageEventLike {
  type: 'message';
  data: string | ArrayBuffer | Blob;
}

export interface CloseEventLike {
  type: 'close';
  code: number;
  reason: string;
  wasClean: boolean;
  /** Whether the client opens a new WebSocket with a new ticket. */
  willReconnect: boolean;
  /** Delay before that, in milliseconds, or null. */
  delayMs: number | null;
}

export interface EventMap {
  open: OpenEvent;
  message: MessageEventLike;
  close: CloseEventLike;
  error: WsTicketError;
}

export type ConnectionState = 'connecting' | 'open' | 'waiting' | 'closed';

export declare class WsTicketConnection {
  readonly state: ConnectionState;
  onopen: ((event: OpenEvent) => void) | null;
  onmessage: ((event: MessageEventLike) => void) | null;
  onclose: ((event: CloseEventLike) => void) | null;
  onerror: ((error: WsTicketError) => void) | null;
  /** Sends on the open WebSocket; returns false and sends nothing while none is open. */
  send(data: string | ArrayBufferLike | Blob | ArrayBufferView): boolean;
  /** Closes for good; no reconnect follows. */
  close(code?: number, reason?: string): void;
  addEventListener<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): void;
  removeEventListener<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): void;
}

/**
 * Opens a WebSocket authenticated by a single-use ticket and keeps it open,
 * requesting a new ticket for every attempt.
 */
export declare function connect(
  ticketUrl: string,
  webSocketUrl: string,
  getToken: (context: TokenContext) => Promise<string>,
  options?: ConnectOptions,
): WsTicketConnection;

/** Computes the delay before retry number `attempt` (1 for the first retry), in milliseconds. */
export declare function backoffDelay(attempt: number, limits?: Limits, random?: () => number): number;

/** Parses a Retry-After value (seconds or an HTTP date) into milliseconds, or null. */
export declare function parseRetryAfter(value: string | null | undefined, now?: number): number | null;
