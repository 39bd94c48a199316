"""Credentials for a trial Flower deployment: a self-signed certificate authority, the
SuperLink's TLS certificate signed by it, and one authentication key pair per SuperNode.

    python make_credentials.py FOLDER [--supernodes=N] [--host=NAME_OR_IP ...] [--force]

writes FOLDER/ca.crt (give it to every SuperNode and to the flwr CLI), FOLDER/server.pem and
FOLDER/server.key (the SuperLink's), and FOLDER/supernode_<i> with FOLDER/supernode_<i>.pub
(each SuperNode's private key, and the public key to register with `flwr supernode register`).
The certificate names localhost and 127.0.0.1 unless --host names the SuperLink's address.
It never replaces credentials already in FOLDER (a live federation would lose its trust root):
--force replaces them, after naming them. For trials on your own machines; a real federation
gets its certificates from its own CA.
Needs the `cryptography` package (installed with requirements-flower.txt).
"""
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def name(common):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'QuPeD trial'),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def certificate(subject, issuer, public_key, signing_key, extensions):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def pem_key(key, openssh=False):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.OpenSSH if openssh
                             else serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def write(path, payload, private=False):
    with open(path, 'wb') as f:
        f.write(payload)
    if private:
        os.chmod(path, 0o600)


USAGE = ("usage: python make_credentials.py FOLDER [--supernodes=N] [--host=NAME_OR_IP ...] "
         "[--force]")


class CredentialsError(Exception):
    """Credentials that cannot be written; the message says what to do."""


def existing(folder):
    """The credentials files already in `folder` (any this script writes, of any count)."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f in ('ca.crt', 'server.pem', 'server.key')
                  or (f.startswith('supernode_') and f.removesuffix('.pub')[10:].isdigit()))


def prepare(folder, force):
    """Create `folder`, or check that it holds no credentials (or, with `force`, say which are
    replaced)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CredentialsError(f"{folder} is a file, not a folder: name a new folder for the "
                               f"credentials.")
    found = existing(folder)
    if found and not force:
        raise CredentialsError(
            f"{folder} already holds credentials ({', '.join(found)}); replacing them would cut "
            f"off every SuperNode that trusts this CA. Name a new folder, or pass --force to "
            f"replace them.")
    if found:
        print(f"replacing {', '.join(found)} in {folder} (--force)")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise CredentialsError(f"cannot create {folder} ({e.strerror}): name a writable "
                               f"folder.") from None
    return found


def make(folder, supernodes=3, hosts=('localhost', '127.0.0.1')):
    """Write the CA, the SuperLink's certificate and the SuperNodes' key pairs into `folder`."""
    os.makedirs(folder, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = certificate(name('QuPeD trial CA'), name('QuPeD trial CA'), ca_key.public_key(),
                          ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alternative = []
    for host in hosts:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alternative.append(x509.DNSName(host))
    server_cert = certificate(name(hosts[0]), ca_cert.subject, server_key.public_key(), ca_key,
                              [(x509.SubjectAlternativeName(alternative), False)])
    write(os.path.join(folder, 'ca.crt'), ca_cert.public_bytes(serialization.Encoding.PEM))
    write(os.path.join(folder, 'server.pem'), server_cert.public_bytes(serialization.Encoding.PEM))
    write(os.path.join(folder, 'server.key'), pem_key(server_key), private=True)
    for i in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        write(os.path.join(folder, f'supernode_{i}'), pem_key(key, openssh=True), private=True)
        write(os.path.join(folder, f'supernode_{i}.pub'), key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return folder


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folders = [a for a in argv if not a.startswith('--')]
    options = [a for a in argv if a.startswith('--')]
    counts = [a.split('=', 1)[1] for a in options if a.startswith('--supernodes=')]
    hosts = [a.split('=', 1)[1] for a in options if a.startswith('--host=')]
    force = '--force' in options
    unknown = [a for a in options if not a.startswith(('--supernodes=', '--host=', '--force'))]
    bad_counts = [c for c in counts if not c.isdigit() or int(c) < 1]
    if len(folders) != 1 or unknown or bad_counts:
        problem = (f"--supernodes={bad_counts[0]}: give the number of SuperNodes, 1 or more"
                   if bad_counts else f"unknown option {unknown[0]}" if unknown else
                   "name one folder for the credentials")
        print(f"error: {problem}.\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        prepare(folders[0], force)
        make(folders[0], int(counts[-1]) if counts else 3,
             tuple(hosts) or ('localhost', '127.0.0.1'))
    except (CredentialsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"credentials in {folders[0]}: ca.crt, server.pem, server.key, supernode_<i>[.pub]")


if __name__ == '__main__':
    main()
