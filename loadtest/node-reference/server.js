'use strict';

// The Node.js reference broker: the WebSocket pub/sub server a team would
// otherwise build with ws, ioredis and pino. The load tests run it beside
// nexus-node for comparison. It speaks the NexusNode protocol
// (docs/protocol.md) the idiomatic way: every request is JSON.parse'd, every
// envelope is JSON.stringify'd once per publish and the same string is passed
// to ws.send for each subscriber. With REDIS_URL set, nodes share messages
// over Redis pub/sub channels `nexus:<topic>`.

const crypto = require('node:crypto');
const http = require('node:http');
const { WebSocketServer } = require('ws');
const Redis = require('ioredis');
const pino = require('pino');

const PORT = Number(process.env.PORT || 3201);
const HOST = process.env.HOST || '127.0.0.1';
const REDIS_URL = process.env.REDIS_URL || '';
const NODE_ID = crypto.randomUUID();
const CHANNEL_PREFIX = 'nexus:';

// The same defaults as nexus-node.
const MAX_TOPIC_LENGTH = 255;
const MAX_SUBSCRIPTIONS = 1024;
const MAX_MESSAGE_SIZE = 64 * 1024;
const PING_INTERVAL_MS = 25_000;

const ACTIONS = new Set(['SUBSCRIBE', 'UNSUBSCRIBE', 'PUBLISH', 'PING']);
const SEGMENT = /^[A-Za-z0-9_\-:@]+$/;

const log = pino({ level: process.env.LOG_LEVEL || 'info' }).child({ node_id: NODE_ID });

/** Sockets by exact topic. */
const exact = new Map();
/** Sockets by wildcard pattern (one containing a `*` or `>` segment). */
const patterns = new Map();

class RequestError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** Returns the reason `topic` breaks the topic rules, or null when it is valid. */
function topicError(topic, allowWildcards) {
  if (topic.length === 0) return ['invalid_topic', 'topic is empty'];
  if (Buffer.byteLength(topic) > MAX_TOPIC_LENGTH) {
    return ['topic_too_long', `topic is longer than ${MAX_TOPIC_LENGTH} bytes`];
  }
  if (!allowWildcards && /[*>]/.test(topic)) {
    return ['wildcard_publish', 'PUBLISH topic contains * or >'];
  }
  const segments = topic.split('.');
  for (let i = 0; i < segments.length; i++) {
    const segment = segments[i];
    if (segment === '*') continue;
    if (segment === '>' && i === segments.length - 1) continue;
    if (segment === '') return ['invalid_topic', `topic segment ${i + 1} is empty`];
    if (!SEGMENT.test(segment)) {
      return ['invalid_topic', `topic segment ${i + 1} contains an invalid character`];
    }
  }
  return null;
}

function isPattern(topic) {
  return topic.includes('*') || topic.includes('>');
}

function patternMatches(pattern, topic) {
  const want = pattern.split('.');
  const have = topic.split('.');
  for (let i = 0; i < want.length; i++) {
    if (want[i] === '>') return have.length > i;
    if (i >= have.length) return false;
    if (want[i] !== '*' && want[i] !== have[i]) return false;
  }
  return want.length === have.length;
}

/** Returns the sockets that receive a message on `topic`, each once. */
function recipients(topic) {
  const direct = exact.get(topic);
  if (patterns.size === 0) return direct || [];
  const all = new Set(direct);
  for (const [pattern, sockets] of patterns) {
    if (!patternMatches(pattern, topic)) continue;
    for (const ws of sockets) all.add(ws);
  }
  return all;
}

function deliver(topic, envelope) {
  for (const ws of recipients(topic)) {
    if (ws.readyState === ws.OPEN) ws.send(envelope);
  }
}

// Cluster link. Each publish goes to Redis as "<node id> <sequence> <topic> <envelope>".
// One Redis PUBLISH can reach this node several times when several of its
// channel subscriptions and patterns match; Redis writes those copies back to
// back, so remembering the last (node, sequence) drops the duplicates.
let link = null;

function redisChannel(topic) {
  // Redis globs: `*` spans dots, so a `>` pattern becomes `prefix.*` and
  // deliveries are filtered again by patternMatches. Topic characters are
  // never glob characters.
  const glob = topic.endsWith('.>') ? `${topic.slice(0, -1)}*` : topic;
  return CHANNEL_PREFIX + glob;
}

function startLink(url) {
  const publisher = new Redis(url);
  const subscriber = new Redis(url);
  const state = { publisher, subscriber, sequence: 0, lastSeen: '' };

  const onRedisMessage = (payload) => {
    const first = payload.indexOf(' ');
    const second = payload.indexOf(' ', first + 1);
    const third = payload.indexOf(' ', second + 1);
    if (payload.slice(0, first) === NODE_ID) return;
    const stamp = payload.slice(0, second);
    if (stamp === state.lastSeen) return;
    state.lastSeen = stamp;
    deliver(payload.slice(second + 1, third), payload.slice(third + 1));
  };
  subscriber.on('message', (_channel, payload) => onRedisMessage(payload));
  subscriber.on('pmessage', (_pattern, _channel, payload) => onRedisMessage(payload));
  for (const [role, client] of [['publisher', publisher], ['subscriber', subscriber]]) {
    client.on('ready', () => log.info({ role }, 'cluster link ready'));
    client.on('error', (error) => log.warn({ role, error: error.message }, 'cluster link error'));
  }
  return state;
}

/**
 * Subscribes or unsubscribes the node on Redis for a local pattern. Returns a
 * promise that settles when Redis has confirmed a new subscription, or null.
 */
function linkStatus() {
  if (!link) return 'standalone';
  const ready = link.publisher.status === 'ready' && link.subscriber.status === 'ready';
  return ready ? 'up' : 'down';
}

function linkInterest(pattern, added) {
  if (!link) return null;
  const channel = redisChannel(pattern);
  const glob = isPattern(pattern);
  const { subscriber } = link;
  if (added) {
    const request = glob ? subscriber.psubscribe(channel) : subscriber.subscribe(channel);
    return request.catch((error) => log.warn({ topic: pattern, error: error.message }, 'redis subscribe failed'));
  }
  // `a.*` and `a.>` share one glob, so it is dropped only when neither remains.
  if (glob && [...patterns.keys()].some((held) => redisChannel(held) === channel)) return;
  const request = glob ? subscriber.punsubscribe(channel) : subscriber.unsubscribe(channel);
  request.catch((error) => log.warn({ topic: pattern, error: error.message }, 'redis unsubscribe failed'));
  return null;
}

/**
 * Adds the subscription. Returns a promise while the node's Redis subscription
 * for the topic is not yet confirmed, so that the reply can wait for it.
 */
function subscribe(ws, topic) {
  if (ws.subscriptions.has(topic)) return null;
  if (ws.subscriptions.size >= MAX_SUBSCRIPTIONS) {
    throw new RequestError('too_many_subscriptions', `connection already has the maximum of ${MAX_SUBSCRIPTIONS} subscriptions; unsubscribe first`);
  }
  const index = isPattern(topic) ? patterns : exact;
  let sockets = index.get(topic);
  if (!sockets) {
    sockets = new Set();
    index.set(topic, sockets);
    const confirmed = linkInterest(topic, true);
    sockets.linkPending = confirmed && confirmed.then(() => {
      sockets.linkPending = null;
    });
  }
  sockets.add(ws);
  ws.subscriptions.add(topic);
  return sockets.linkPending;
}

function unsubscribe(ws, topic) {
  if (!ws.subscriptions.delete(topic)) return false;
  const index = isPattern(topic) ? patterns : exact;
  const sockets = index.get(topic);
  sockets.delete(ws);
  if (sockets.size === 0) {
    index.delete(topic);
    linkInterest(topic, false);
  }
  return true;
}

function publish(topic, data) {
  if (link && link.publisher.status !== 'ready') {
    throw new RequestError('cluster_unavailable', 'the cluster link to Redis is down');
  }
  const envelope = JSON.stringify({ type: 'message', topic, data });
  deliver(topic, envelope);
  if (link) {
    link.sequence += 1;
    link.publisher.publish(CHANNEL_PREFIX + topic, `${NODE_ID} ${link.sequence} ${topic} ${envelope}`);
  }
}

/** Checks the request's fields, throwing a RequestError named for the first broken rule. */
function validate(request) {
  if (request === null || typeof request !== 'object' || Array.isArray(request)) {
    throw new RequestError('invalid_request', 'request is not a JSON object');
  }
  if ('id' in request && typeof request.id !== 'string' && !Number.isInteger(request.id)) {
    throw new RequestError('invalid_request', 'id must be a string or an integer');
  }
  if (typeof request.action !== 'string') {
    throw new RequestError('invalid_request', 'action must be a string');
  }
  if (!ACTIONS.has(request.action)) {
    throw new RequestError('unknown_action', `unknown action ${JSON.stringify(request.action)}`);
  }
  if (request.action === 'PING') return;
  if (!('topic' in request)) throw new RequestError('missing_topic', `${request.action} needs a topic`);
  if (typeof request.topic !== 'string') throw new RequestError('invalid_request', 'topic must be a string');
  const broken = topicError(request.topic, request.action !== 'PUBLISH');
  if (broken) throw new RequestError(broken[0], broken[1]);
  if (request.action === 'PUBLISH' && !('data' in request)) {
    throw new RequestError('missing_data', 'PUBLISH needs data (use null for an empty message)');
  }
}

function reply(ws, message, id) {
  if (id !== undefined) message.id = id;
  ws.send(JSON.stringify(message));
}

function handleRequest(ws, request) {
  const { action, topic, id } = request;
  switch (action) {
    case 'SUBSCRIBE': {
      // In a cluster the reply waits for Redis, so that a client that
      // publishes right after the reply reaches this subscriber.
      const pending = subscribe(ws, topic);
      if (pending) return pending.then(() => reply(ws, { type: 'subscribed', topic }, id));
      return reply(ws, { type: 'subscribed', topic }, id);
    }
    case 'UNSUBSCRIBE':
      if (!unsubscribe(ws, topic)) {
        throw new RequestError('not_subscribed', `this connection has no subscription ${topic}`);
      }
      return reply(ws, { type: 'unsubscribed', topic }, id);
    case 'PUBLISH':
      publish(topic, request.data);
      if (id !== undefined) reply(ws, { type: 'published', topic }, id);
      return undefined;
    default:
      return reply(ws, { type: 'pong' }, id);
  }
}

function onMessage(ws, raw, isBinary) {
  ws.isAlive = true;
  if (isBinary) {
    return reply(ws, { type: 'error', code: 'binary_not_supported', message: 'send text frames' });
  }
  let request;
  try {
    request = JSON.parse(raw);
  } catch (error) {
    return reply(ws, { type: 'error', code: 'invalid_json', message: error.message });
  }
  const readableId = request && (typeof request.id === 'string' || Number.isInteger(request.id));
  const id = readableId ? request.id : undefined;
  try {
    validate(request);
    return handleRequest(ws, request);
  } catch (error) {
    if (!(error instanceof RequestError)) throw error;
    return reply(ws, { type: 'error', code: error.code, message: error.message }, id);
  }
}

function onConnection(ws, httpRequest) {
  ws.isAlive = true;
  ws.subscriptions = new Set();
  const remote = `${httpRequest.socket.remoteAddress}:${httpRequest.socket.remotePort}`;
  log.debug({ remote_addr: remote }, 'connection opened');
  ws.on('pong', () => {
    ws.isAlive = true;
  });
  ws.on('message', (raw, isBinary) => onMessage(ws, raw, isBinary));
  ws.on('error', (error) => log.debug({ remote_addr: remote, error: error.message }, 'connection error'));
  ws.on('close', (code) => {
    for (const topic of [...ws.subscriptions]) unsubscribe(ws, topic);
    log.debug({ remote_addr: remote, code }, 'connection closed');
  });
}

function main() {
  const server = http.createServer((request, response) => {
    if (request.url === '/health') {
      // The same shape as nexus-node's report: degraded while the Redis link is down.
      const linkState = linkStatus();
      const status = linkState === 'down' ? 'degraded' : 'ok';
      response.writeHead(200, { 'content-type': 'application/json' });
      return response.end(JSON.stringify({ status, node_id: NODE_ID, connections: wss.clients.size, link: linkState }));
    }
    response.writeHead(404);
    return response.end();
  });
  const wss = new WebSocketServer({ server, maxPayload: MAX_MESSAGE_SIZE });
  wss.on('connection', onConnection);

  // The ws heartbeat idiom: a socket that has sent neither a pong nor a
  // message since the previous ping is terminated at the next one. This
  // allows up to two intervals of silence, not nexus-node's interval plus
  // pong timeout.
  const heartbeat = setInterval(() => {
    for (const ws of wss.clients) {
      if (!ws.isAlive) {
        ws.terminate();
        continue;
      }
      ws.isAlive = false;
      ws.ping();
    }
  }, PING_INTERVAL_MS);

  if (REDIS_URL) link = startLink(REDIS_URL);

  const shutdown = (signal) => {
    log.info({ signal }, 'node shutting down');
    clearInterval(heartbeat);
    for (const ws of wss.clients) ws.close(1001, 'node shutting down');
    server.close();
    if (link) {
      link.publisher.disconnect();
      link.subscriber.disconnect();
    }
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);

  server.listen(PORT, HOST, () => {
    log.info({ host: HOST, port: PORT, cluster: Boolean(REDIS_URL) }, 'node started');
  });
}

main();
