// A real OpenID Connect provider (panva's oidc-provider, certified) for Gate's sign-in tests.
// Usage: node idp.mjs <port> <redirect_uri>[,<redirect_uri>...]
// devInteractions make login a plain form post (any password). POST /test/deprovision?sub=<id> removes an account,
// so its refresh tokens are refused (invalid_grant), as when a company deprovisions someone.
import http from 'node:http';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const redirectUris = process.argv[3].split(',');
const issuer = `http://127.0.0.1:${port}`;

const accounts = {
  alice: { email: 'alice@example.com', email_verified: true, name: 'Alice Example', groups: ['engineering'] },
  bob: { email: 'bob@example.com', email_verified: true, name: 'Bob Example', groups: ['sales'] },
  dave: { email: 'dave@example.com', email_verified: true, name: 'Dave Example', groups: ['engineering'] },
  carol: { email: 'carol@example.com', email_verified: true, name: 'Carol Example', groups: ['engineering', 'admins'] },
  mallory: { email: 'mallory@elsewhere.test', email_verified: true, name: 'Mallory', groups: ['engineering'] },
  unverified: { email: 'unverified@example.com', email_verified: false, name: 'Unverified', groups: ['engineering'] },
};
const deprovisioned = new Set();

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'gate',
    client_secret: 'gate-test-secret',
    redirect_uris: redirectUris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name', 'groups'] },
  cookies: { keys: ['gate-test-cookie-key'] },
  async findAccount(ctx, id) {
    if (!accounts[id] || deprovisioned.has(id)) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...accounts[id] }; } };
  },
});
provider.proxy = false;
const callback = provider.callback();

http.createServer((req, res) => {
  const url = new URL(req.url, issuer);
  if (req.method === 'POST' && url.pathname === '/test/deprovision') {
    deprovisioned.add(url.searchParams.get('sub'));
    res.writeHead(204).end();
    return;
  }
  callback(req, res);
}).listen(port, '127.0.0.1', () => { console.log(`ready ${issuer}`); });
