// Calls semroute.v1.Router from Node with @grpc/grpc-js, loading the contract straight from
// protos/ (no generated code). Usage: node route_client.js HOST:PORT QUERY [TOKEN]
// Prints one JSON object: the Route reply (explain on), a RouteBatch reply, the index info and
// the status of a deliberately invalid call, so the Python test can check every field.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');

function loadRouter() {
  const definition = protoLoader.loadSync('semroute/v1/router.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (the contract)
    longs: Number,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).semroute.v1.Router;
}

function call(client, method, request, metadata) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + 10000);
    client[method](request, metadata, { deadline }, (err, reply) => {
      if (err) {
        resolve({ code: grpc.status[err.code], details: err.details });
      } else {
        resolve({ code: 'OK', reply });
      }
    });
  });
}

async function main() {
  const [addr, query, token] = process.argv.slice(2);
  if (!addr || !query) {
    console.error('usage: node route_client.js HOST:PORT QUERY [TOKEN]');
    process.exit(2);
  }
  const Router = loadRouter();
  const client = new Router(addr, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set('x-request-id', 'node-contract-test');
  if (token) metadata.set('authorization', `Bearer ${token}`);

  const out = {};
  out.route = await call(client, 'Route', {
    query,
    history: ['hello there'],
    policy: { allowed_targets: [], require_local: true, quality_tolerance: 0.0 },
    explain: true,
  }, metadata);
  out.batch = await call(client, 'RouteBatch', {
    requests: [{ query }, { query: 'Write a haiku about the sea' }],
  }, metadata);
  out.info = await call(client, 'GetIndexInfo', {}, metadata);
  out.invalid = await call(client, 'Route', { query: '   ' }, metadata);
  client.close();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
