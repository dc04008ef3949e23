#!/usr/bin/env python3
"""Minimal Docker/OCI token server for tests (distribution token auth).

    token-server.py DIR PORT USER:PASS

Creates DIR/token.key (EC P-256) and DIR/token.crt (self-signed) if missing,
then serves GET /token?service=...&scope=... on 127.0.0.1:PORT. Requests must
carry HTTP Basic credentials matching USER:PASS, else 401. Every requested
scope is granted in full. The token is an ES256 JWT whose header carries the
certificate as `x5c`; the registry trusts it via `rootcertbundle: DIR/token.crt`
(see distribution registry/auth/token: x5c chain verified against the bundle,
signature checked with the leaf key, raw r||s encoding).
PORT 0 binds a free port. Either way the bound port is written to DIR/token.port
once the key, certificate and listening socket are ready.
Needs Python 3.11+ and the `cryptography` package.
"""
import base64
import datetime as dt
import hmac
import json
import os
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

ISSUER = "outpost-test-issuer"  # must match auth.token.issuer in the registry config
TTL_S = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_or_create_key(directory: str):
    """Return (private key, DER certificate), creating token.key/token.crt if missing."""
    key_path = os.path.join(directory, "token.key")
    crt_path = os.path.join(directory, "token.crt")
    if os.path.exists(key_path) and os.path.exists(crt_path):
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(crt_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        os.makedirs(directory, exist_ok=True)
        # Write via temp files + rename so a concurrent reader never sees half a file.
        for path, data in (
            (key_path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())),
            (crt_path, cert.public_bytes(serialization.Encoding.PEM)),
        ):
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.chmod(path + ".tmp", 0o600 if path == key_path else 0o644)
            os.replace(path + ".tmp", path)
    return key, cert.public_bytes(serialization.Encoding.DER)


def parse_scope(scope: str):
    """'repository:acme/shop:pull,push' -> access entry. Split at the first and the
    last colon, so a name with a colon (e.g. host:port/repo) stays intact."""
    typ, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not typ or not name:
        return None
    return {"type": typ, "name": name, "actions": [a for a in actions.split(",") if a]}


def make_token(key, cert_der: bytes, user: str, service: str, scopes: list[str]) -> str:
    now = int(time.time())
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert_der).decode()]}
    claims = {
        "iss": ISSUER,
        "sub": user,
        "aud": service,
        "exp": now + TTL_S,
        "nbf": now - 1,
        "iat": now,
        "jti": secrets.token_hex(16),
        "access": [a for a in map(parse_scope, scopes) if a],
    }
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    # cryptography yields DER; JOSE wants fixed-width big-endian r||s (32 bytes each).
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def main() -> None:
    if len(sys.argv) != 4 or ":" not in sys.argv[3]:
        sys.exit("usage: token-server.py DIR PORT USER:PASS")
    directory, port, creds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    user = creds.split(":", 1)[0]
    expected_auth = "Basic " + base64.b64encode(creds.encode()).decode()
    key, cert_der = load_or_create_key(directory)

    class Handler(BaseHTTPRequestHandler):
        def send_json(self, code: int, body: dict, extra: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            url = urlsplit(self.path)
            if url.path != "/token":
                self.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": "no such endpoint"}]})
                return
            # Constant-time compare; anonymous and wrong credentials both get 401.
            if not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                       expected_auth.encode()):
                self.send_json(401, {"errors": [{"code": "UNAUTHORIZED",
                                                 "message": "authentication required"}]},
                               {"WWW-Authenticate": 'Basic realm="outpost-test-token"'})
                return
            query = parse_qs(url.query)
            service = query.get("service", [""])[0]
            token = make_token(key, cert_der, user, service, query.get("scope", []))
            issued = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
            self.send_json(200, {"token": token, "access_token": token, "expires_in": TTL_S,
                                 "issued_at": issued.isoformat().replace("+00:00", "Z")})

        def log_message(self, fmt: str, *args) -> None:  # stderr, one line per request
            sys.stderr.write("token-server: %s\n" % (fmt % args))

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # already listening
    port = server.server_address[1]
    with open(os.path.join(directory, "token.port.tmp"), "w") as f:
        f.write(f"{port}\n")
    os.replace(os.path.join(directory, "token.port.tmp"), os.path.join(directory, "token.port"))
    print(f"token-server: 127.0.0.1:{port} pid {os.getpid()}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
