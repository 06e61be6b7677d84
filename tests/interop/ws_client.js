// Publish/subscribe check with the `ws` package, a WebSocket client written outside this project.
//
// Usage: node ws_client.js URL MODE
//   both        subscribe and publish on two connections, then check the delivery
//   subscriber  subscribe, print "subscribed", then wait for and check the delivery
//   publisher   publish once and close
// Exits 0 on success and 1 with a message on stderr otherwise; gives up after 10 s.
'use strict';

const assert = require('node:assert/strict');
const WebSocket = require('ws');

// The frames are sent exactly as written here.
const SUBSCRIBE = '{"action":"SUBSCRIBE","topic":"market_updates"}';
const PUBLISH =
  '{"action":"PUBLISH","topic":"market_updates","data":{"symbol":"BTC/USD","price":64000}}';
const EXPECTED_DATA = { symbol: 'BTC/USD', price: 64000 };
const TIMEOUT_MS = 10000;

function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

function nextMessage(ws) {
  return new Promise((resolve, reject) => {
    ws.once('message', (data, isBinary) => {
      if (isBinary) {
        reject(new Error('received a binary message'));
      } else {
        resolve(JSON.parse(data.toString('utf8')));
      }
    });
    ws.once('close', (code) => reject(new Error(`connection closed with ${code}`)));
  });
}

async function subscribe(url) {
  const ws = await open(url);
  const reply = nextMessage(ws);
  ws.send(SUBSCRIBE);
  assert.deepEqual(await reply, { type: 'subscribed', topic: 'market_updates' });
  return ws;
}

async function expectDelivery(ws) {
  const message = await nextMessage(ws);
  assert.equal(message.type, 'message', `delivery ${JSON.stringify(message)}`);
  assert.equal(message.topic, 'market_updates', `delivery ${JSON.stringify(message)}`);
  assert.deepEqual(message.data, EXPECTED_DATA, `delivery ${JSON.stringify(message)}`);
}

async function publish(url) {
  const ws = await open(url);
  ws.send(PUBLISH);
  // A normal close is sent after the PUBLISH, so the node reads the PUBLISH first.
  await new Promise((resolve) => {
    ws.once('close', resolve);
    ws.close(1000);
  });
}

async function main() {
  const [url, mode] = process.argv.slice(2);
  if (mode === 'both') {
    const subscriber = await subscribe(url);
    const delivery = expectDelivery(subscriber);
    await publish(url);
    await delivery;
    subscriber.close(1000);
  } else if (mode === 'subscriber') {
    const subscriber = await subscribe(url);
    const delivery = expectDelivery(subscriber);
    console.log('subscribed');
    await delivery;
    subscriber.close(1000);
  } else if (mode === 'publisher') {
    await publish(url);
  } else {
    throw new Error(`unknown mode ${JSON.stringify(mode)}: expected both, subscriber or publisher`);
  }
  console.log('ok');
}

setTimeout(() => {
  console.error(`timed out after ${TIMEOUT_MS} ms`);
  process.exit(1);
}, TIMEOUT_MS).unref();

main().then(
  () => process.exit(0),
  (error) => {
    console.error(error.stack || String(error));
    process.exit(1);
  },
);
