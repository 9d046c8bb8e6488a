// A dirtytrack client in JavaScript, built from proto/dirtytrack/v1/dirtytrack.proto
// alone (no generated code, no Python): tests/test_node_client.py drives it to prove
// clients in other languages work.
//
//   node client.js ADDRESS PID|TARGET_ID
//
// ADDRESS is a gRPC address ("unix:/run/dirtytrack/dirtytrack.sock"). Given a pid it
// attaches the process; given a target id ("tgt-...") it uses that target. It checks the
// standard health service, opens a cursor and prints one JSON line:
//   {"event": "ready", "health": {...}, "target_id", "attached", "cursor_id", "page_size"}
// then answers commands read from stdin, one a line, with one JSON line each:
//   collect AFTER_SEQ   Collect the set after AFTER_SEQ -> {"event": "set", ...}: seq,
//                       full_resync, resync, and per mapping piece the dirty ranges decoded
//                       from `runs` or `bitmap` (addresses as decimal strings: uint64)
//   quit                close the cursor and exit 0
// A failed RPC prints {"event": "error", "rpc", "code", "details"} and exits 1.
'use strict';

const path = require('path');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const ROOT = path.resolve(__dirname, '..', '..');
const LOAD = {keepCase: true, longs: String, enums: String, bytes: Buffer, defaults: true,
              oneofs: true};

function load() {
  const dt = protoLoader.loadSync('dirtytrack/v1/dirtytrack.proto',
                                  {...LOAD, includeDirs: [path.join(ROOT, 'proto')]});
  const health = protoLoader.loadSync(path.join(__dirname, 'health.proto'), LOAD);
  return {
    DirtyTracker: grpc.loadPackageDefinition(dt).dirtytrack.v1.DirtyTracker,
    Health: grpc.loadPackageDefinition(health).grpc.health.v1.Health,
  };
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

class RpcFailed extends Error {
  constructor(rpc, err) {
    super(`${rpc}: ${err.details || err.message}`);
    this.rpc = rpc;
    this.code = grpc.status[err.code] || String(err.code);
    this.details = err.details || err.message;
  }
}

function unary(stub, rpc, request, seconds = 30) {
  return new Promise((resolve, reject) => {
    stub[rpc](request, {deadline: deadline(seconds)}, (err, response) => {
      if (err) reject(new RpcFailed(rpc, err));
      else resolve(response);
    });
  });
}

// Collect answers one set, split into chunks (same seq, chunk_index 0.., last_chunk).
function collect(stub, cursorId, afterSeq) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = stub.Collect({cursor_id: cursorId, after_seq: String(afterSeq)},
                              {deadline: deadline(60)});
    call.on('data', (response) => chunks.push(response.chunk));
    call.on('error', (err) => reject(new RpcFailed('Collect', err)));
    call.on('end', () => resolve(chunks));
  });
}

// Unsigned LEB128 varint at buf[pos]: [value as BigInt, next position].
function varint(buf, pos) {
  let value = 0n;
  let shift = 0n;
  for (;;) {
    if (pos >= buf.length) throw new Error('truncated varint in runs');
    const byte = buf[pos++];
    value |= BigInt(byte & 0x7f) << shift;
    if (!(byte & 0x80)) return [value, pos];
    shift += 7n;
  }
}

// Dirty page runs [first, stop) of a MappingDirty piece, relative to its mapping,
// from the documented encodings (proto/dirtytrack/v1/dirtytrack.proto, MappingDirty.pages).
function pieceRuns(piece) {
  const first = BigInt(piece.first_page);
  const npages = BigInt(piece.npages);
  const runs = [];
  const problems = [];
  if (piece.pages === 'runs') {
    // (gap, length) pairs: a run starts `gap` pages after the end of the previous run
    // (after first_page for the first) and is `length` pages long.
    let page = first;
    let pos = 0;
    const body = piece.runs;
    while (pos < body.length) {
      let gap, length;
      [gap, pos] = varint(body, pos);
      [length, pos] = varint(body, pos);
      if (length === 0n) problems.push('empty run');
      runs.push([page + gap, page + gap + length]);
      page += gap + length;
    }
    if (page > first + npages) problems.push(`runs end at page ${page}, beyond the piece`);
  } else if (piece.pages === 'bitmap') {
    // One bit a page, page i at bit (i % 8) of byte (i / 8), LSB first.
    const bits = piece.bitmap;
    let open = null;
    for (let i = 0; i < bits.length * 8; i++) {
      const set = (bits[i >> 3] >> (i & 7)) & 1;
      if (set && BigInt(i) >= npages) problems.push(`bit ${i} set beyond npages ${npages}`);
      if (set && open === null) open = i;
      if (!set && open !== null) {
        runs.push([first + BigInt(open), first + BigInt(i)]);
        open = null;
      }
    }
    if (open !== null) runs.push([first + BigInt(open), first + BigInt(bits.length * 8)]);
  }
  return {runs, problems};
}

function setView(chunks, pageSize) {
  if (chunks.length === 0) throw new Error('Collect ended without a chunk');
  const head = chunks[0];
  const problems = [];
  chunks.forEach((c, i) => {
    if (c.seq !== head.seq) problems.push(`chunk ${i} has seq ${c.seq}, not ${head.seq}`);
    if (c.chunk_index !== i) problems.push(`chunk ${i} says chunk_index ${c.chunk_index}`);
    if (c.last_chunk !== (i === chunks.length - 1)) problems.push(`chunk ${i}: last_chunk`);
  });
  const size = BigInt(head.page_size || pageSize);
  const mappings = [];
  for (const chunk of chunks) {
    for (const piece of chunk.mappings) {
      const {runs, problems: p} = pieceRuns(piece);
      problems.push(...p.map((x) => `mapping ${piece.mapping_id}: ${x}`));
      const start = BigInt(piece.start);
      const decoded = runs.reduce((n, [lo, hi]) => n + (hi - lo), 0n);
      mappings.push({
        mapping_id: piece.mapping_id, name: piece.name, kind: piece.kind,
        status: piece.status, reason: piece.reason,
        start: piece.start, end: piece.end, first_page: piece.first_page, npages: piece.npages,
        form: piece.pages || null, dirty_pages: piece.dirty_pages,
        decoded_pages: decoded.toString(),
        // Byte address of page p of the mapping: start + p * page_size.
        ranges: runs.map(([lo, hi]) => [(start + lo * size).toString(),
                                         (start + hi * size).toString()]),
      });
    }
  }
  return {
    event: 'set', cursor_id: head.cursor_id, target_id: head.target_id, seq: head.seq,
    full_resync: head.full_resync, resync: head.resync, target_exited: head.target_exited,
    page_size: head.page_size, set_dirty_pages: head.set_dirty_pages, chunks: chunks.length,
    removed: head.removed, mappings, problems,
  };
}

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const [address, what] = process.argv.slice(2);
  if (!address || !what) {
    process.stderr.write('usage: node client.js ADDRESS PID|TARGET_ID\n');
    process.exit(2);
  }
  const {DirtyTracker, Health} = load();
  const creds = grpc.credentials.createInsecure();          // a unix socket: 0600, root only
  const stub = new DirtyTracker(address, creds);
  const health = new Health(address, creds);

  const healthStatus = {};
  for (const service of ['', 'dirtytrack.v1.DirtyTracker']) {
    healthStatus[service] = (await unary(health, 'Check', {service}, 10)).status;
  }
  let targetId = what;
  let attached = false;
  if (/^\d+$/.test(what)) {
    const r = await unary(stub, 'Attach', {pid: what});
    targetId = r.target.target_id;
    attached = !r.already_attached;
  }
  const opened = await unary(stub, 'OpenCursor', {target_id: targetId, label: 'node client'});
  say({event: 'ready', health: healthStatus, target_id: targetId, attached,
       cursor_id: opened.cursor_id, page_size: opened.page_size});

  const lines = readline.createInterface({input: process.stdin});
  for await (const line of lines) {
    const [cmd, arg] = line.trim().split(/\s+/);
    if (cmd === 'collect') {
      say(setView(await collect(stub, opened.cursor_id, arg || '0'), opened.page_size));
    } else if (cmd === 'quit') {
      break;
    } else if (cmd) {
      say({event: 'error', rpc: null, code: 'UNKNOWN_COMMAND', details: line});
    }
  }
  await unary(stub, 'CloseCursor', {cursor_id: opened.cursor_id});
  stub.close();
  health.close();
}

main().then(() => process.exit(0), (err) => {
  say({event: 'error', rpc: err.rpc || null, code: err.code || 'CLIENT_ERROR',
       details: err.details || String(err && err.stack || err)});
  process.exit(1);
});
