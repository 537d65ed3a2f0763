// @azure/service-bus, Microsoft's JavaScript client, against sblocal: the core steps of a peek-lock queue.
// A second client written independently of the Python SDK, so the broker is not shaped around one client.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { ServiceBusClient } from "@azure/service-bus";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const sblocalBin = path.join(repoRoot, "target", "debug", "sblocal");

let broker;
let dir;
let env;
let client;

function parseEnvFile(file) {
  const values = {};
  for (const line of readFileSync(file, "utf8").split("\n")) {
    const eq = line.indexOf("=");
    if (eq > 0 && !line.startsWith("#")) values[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return values;
}

function startBroker() {
  if (!existsSync(sblocalBin)) {
    throw new Error(`${sblocalBin} is missing: run 'cargo build -p sblocal' first`);
  }
  dir = mkdtempSync(path.join(tmpdir(), "sblocal-node-"));
  broker = spawn(
    sblocalBin,
    ["serve", "--dir", dir, "--amqp", "127.0.0.1:0", "--amqps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--https", "127.0.0.1:0"],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("sblocal did not print 'ready' within 30 s")), 30_000);
    broker.once("exit", (code) => reject(new Error(`sblocal exited early with ${code}`)));
    createInterface({ input: broker.stdout }).on("line", (line) => {
      if (line.trim() === "ready") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

before(async () => {
  await startBroker();
  env = parseEnvFile(path.join(dir, "emulator.env"));
  client = new ServiceBusClient(env.AZURE_SERVICEBUS_CONNECTION_STRING);
});

after(async () => {
  await client?.close();
  broker?.kill("SIGTERM");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const queue = () => env.AZURE_SERVICEBUS_QUEUE_NAME;

async function drain(receiver) {
  for (;;) {
    const got = await receiver.receiveMessages(50, { maxWaitTimeInMs: 300 });
    if (got.length === 0) return;
    for (const m of got) await receiver.completeMessage(m);
  }
}

test("sends a batch and receives it in peek-lock, in order, then completes", async () => {
  const sender = client.createSender(queue());
  const receiver = client.createReceiver(queue());
  await drain(receiver);
  const batch = await sender.createMessageBatch();
  for (let i = 0; i < 5; i++) {
    assert.ok(batch.tryAddMessage({ body: `batch-${i}`, messageId: `js-${i}`, applicationProperties: { index: i } }));
  }
  await sender.sendMessages(batch);
  const received = [];
  while (received.length < 5) {
    const got = await receiver.receiveMessages(5 - received.length, { maxWaitTimeInMs: 2000 });
    assert.ok(got.length > 0, "broker delivered nothing");
    received.push(...got);
  }
  assert.deepEqual(received.map((m) => m.body), ["batch-0", "batch-1", "batch-2", "batch-3", "batch-4"]);
  assert.deepEqual(received.map((m) => m.messageId), ["js-0", "js-1", "js-2", "js-3", "js-4"]);
  assert.equal(received[3].applicationProperties.index, 3);
  for (const m of received) {
    assert.ok(m.lockToken, "peek-lock message carries a lock token");
    assert.ok(m.sequenceNumber !== undefined);
    await receiver.completeMessage(m);
  }
  const rest = await receiver.receiveMessages(1, { maxWaitTimeInMs: 500 });
  assert.equal(rest.length, 0, "completed messages are gone");
  await sender.close();
  await receiver.close();
});

test("abandon returns the message with delivery count + 1", async () => {
  const sender = client.createSender(queue());
  const receiver = client.createReceiver(queue());
  await drain(receiver);
  await sender.sendMessages({ body: "abandon-me" });
  const [first] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 2000 });
  assert.equal(first.body, "abandon-me");
  await receiver.abandonMessage(first);
  const [again] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 2000 });
  assert.equal(again.body, "abandon-me");
  assert.equal(again.deliveryCount, first.deliveryCount + 1);
  await receiver.completeMessage(again);
  await sender.close();
  await receiver.close();
});

test("dead-lettered message is readable from the DLQ with reason and description", async () => {
  const sender = client.createSender(queue());
  const receiver = client.createReceiver(queue());
  const dlq = client.createReceiver(queue(), { subQueueType: "deadLetter" });
  await drain(receiver);
  await drain(dlq);
  await sender.sendMessages({ body: "poison" });
  const [message] = await receiver.receiveMessages(1, { maxWaitTimeInMs: 2000 });
  await receiver.deadLetterMessage(message, { deadLetterReason: "Bad", deadLetterErrorDescription: "cannot parse" });
  const [dead] = await dlq.receiveMessages(1, { maxWaitTimeInMs: 2000 });
  assert.equal(dead.body, "poison");
  assert.equal(dead.deadLetterReason, "Bad");
  assert.equal(dead.deadLetterErrorDescription, "cannot parse");
  await dlq.completeMessage(dead);
  await sender.close();
  await receiver.close();
  await dlq.close();
});

test("peek reads without locking, and receiveAndDelete removes", async () => {
  const sender = client.createSender(queue());
  const receiver = client.createReceiver(queue(), { receiveMode: "receiveAndDelete" });
  const cleaner = client.createReceiver(queue());
  await drain(cleaner);
  await cleaner.close();
  await sender.sendMessages([{ body: "p-1" }, { body: "p-2" }]);
  const peeked = await receiver.peekMessages(2);
  assert.deepEqual(peeked.map((m) => m.body), ["p-1", "p-2"]);
  const taken = [];
  while (taken.length < 2) {
    const got = await receiver.receiveMessages(2 - taken.length, { maxWaitTimeInMs: 2000 });
    assert.ok(got.length > 0, "broker delivered nothing");
    taken.push(...got);
  }
  assert.deepEqual(taken.map((m) => m.body), ["p-1", "p-2"]);
  const left = await receiver.receiveMessages(1, { maxWaitTimeInMs: 500 });
  assert.equal(left.length, 0);
  await sender.close();
  await receiver.close();
});
