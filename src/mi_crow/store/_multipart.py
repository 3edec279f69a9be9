"""Listing and aborting incomplete multipart uploads, which obstore (0.12.1) cannot do.

A writer killed during a multipart upload leaves the upload's parts on the server: invisible to
every listing, still stored (and billed). ``ObjectStore.gc`` aborts those under its prefix that
were started before its grace period, with two S3 requests signed here (SigV4 in headers,
``urllib``): ``ListMultipartUploads`` and ``AbortMultipartUpload``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass(frozen=True)
class Upload:
    key: str
    upload_id: str
    initiated: datetime | None


@dataclass(frozen=True)
class Signer:
    """Where and as whom to send the requests."""

    endpoint: str  # scheme://host[:port], no path
    bucket: str
    region: str
    access_key: str
    secret_key: str
    session_token: str | None
    virtual_hosted: bool
    proxies: dict[str, str] | None  # None: urllib's own (the environment's)

    @classmethod
    def from_settings(cls, bucket: str, config: Mapping[str, Any], client_options: Mapping[str, Any]) -> Signer | None:
        """The store's own settings, else the ``AWS_*`` variables obstore also reads; ``None``
        without explicit credentials (instance profiles and the like are obstore's alone)."""

        def get(*names: str) -> str | None:
            for name in names:
                value = config.get(name)
                if value:
                    return str(value)
            for name in names:
                value = os.environ.get(f"AWS_{name.upper()}")
                if value:
                    return value
            return None

        access = get("access_key_id")
        secret = get("secret_access_key")
        if not access or not secret:
            return None
        region = get("region", "default_region") or "us-east-1"
        endpoint = get("aws_endpoint_url_s3", "endpoint_url_s3", "endpoint", "endpoint_url")
        virtual = str(get("virtual_hosted_style_request") or "").lower() in ("1", "true")
        if endpoint is None:
            endpoint, virtual = f"https://s3.{region}.amazonaws.com", True
        host = urllib.parse.urlsplit(endpoint).hostname or ""
        excluded = [h.strip() for h in str(client_options.get("proxy_excludes", "")).split(",") if h.strip()]
        proxies: dict[str, str] | None = None
        if _is_loopback(host) or host in excluded:
            proxies = {}
        elif client_options.get("proxy_url"):
            proxies = {"http": str(client_options["proxy_url"]), "https": str(client_options["proxy_url"])}
        return cls(
            endpoint.rstrip("/"), bucket, region, access, secret, get("session_token", "token"), virtual, proxies
        )

    def request(self, method: str, key: str = "", query: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """One signed request without a body; ``(status, body)``."""
        parts = urllib.parse.urlsplit(self.endpoint)
        netloc = f"{self.bucket}.{parts.netloc}" if self.virtual_hosted else parts.netloc
        path = ("/" if self.virtual_hosted else f"/{self.bucket}/") + urllib.parse.quote(key, safe="/~")
        q = dict(query or {})
        canonical_query = "&".join(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in sorted(q.items())
        )
        now = datetime.now(timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        empty_hash = hashlib.sha256(b"").hexdigest()
        headers = {"host": netloc, "x-amz-content-sha256": empty_hash, "x-amz-date": amz_date}
        if self.session_token:
            headers["x-amz-security-token"] = self.session_token
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [method, path, canonical_query, *(f"{h}:{headers[h]}" for h in sorted(headers)), "", signed, empty_hash]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key_bytes = f"AWS4{self.secret_key}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        )
        url = f"{parts.scheme}://{netloc}{path}" + (f"?{canonical_query}" if canonical_query else "")
        handlers = [] if self.proxies is None else [urllib.request.ProxyHandler(self.proxies)]
        opener = urllib.request.build_opener(*handlers)
        req = urllib.request.Request(url, method=method, headers=headers)
        try:
            with opener.open(req, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()

    def uploads(self, prefix: str) -> Iterator[Upload]:
        """Every incomplete multipart upload whose key starts with ``prefix`` (all pages)."""
        query = {"uploads": "", "prefix": prefix}
        while True:
            status, body = self.request("GET", query=query)
            if status == 404 and b"NoSuchBucket" in body:
                return
            if status != 200:
                raise OSError(f"ListMultipartUploads on s3://{self.bucket}: HTTP {status}: {body[:300]!r}")
            root = ET.fromstring(body)
            for u in root.iter(f"{_NS}Upload"):
                yield Upload(
                    u.findtext(f"{_NS}Key") or "",
                    u.findtext(f"{_NS}UploadId") or "",
                    _time(u.findtext(f"{_NS}Initiated")),
                )
            next_key = root.findtext(f"{_NS}NextKeyMarker") or ""
            next_id = root.findtext(f"{_NS}NextUploadIdMarker") or ""
            if root.findtext(f"{_NS}IsTruncated") != "true" or not (next_key or next_id):
                return  # the last page (or a server that says more but gives no marker to go on)
            query = {"uploads": "", "prefix": prefix, "key-marker": next_key, "upload-id-marker": next_id}

    def abort(self, upload: Upload) -> bool:
        """Abort ``upload``; False if it was gone already (completed or aborted meanwhile)."""
        status, body = self.request("DELETE", upload.key, {"uploadId": upload.upload_id})
        if status in (200, 204):
            return True
        if status == 404:
            return False
        raise OSError(f"AbortMultipartUpload of s3://{self.bucket}/{upload.key}: HTTP {status}: {body[:300]!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
