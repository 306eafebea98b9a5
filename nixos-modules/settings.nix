# The configuration files the NixOS module writes, as plain attribute sets, computed
# from the module's options with nothing but builtins: CI evaluates this without
# nixpkgs and checks the result with `paddock config check`.
let
  # Merges `b` into `a`, recursing into attribute sets; `b` wins elsewhere.
  merge = a: b:
    a // builtins.mapAttrs
      (name: value:
        if builtins.isAttrs value && builtins.isAttrs (a.${name} or null)
        then merge a.${name} value
        else value)
      b;
  withoutNulls = builtins.mapAttrs (_: section: removeNulls section);
  removeNulls = attrs:
    builtins.listToAttrs (builtins.filter (kv: kv.value != null)
      (map (name: { inherit name; value = attrs.${name}; }) (builtins.attrNames attrs)));
  # Secrets reach the services through systemd's LoadCredential: the unit reads
  # each file (as root, wherever it is) into a private directory only the service
  # can read, and the configuration names the copy there. Each entry is
  # { name; file; } for LoadCredential; `path` is where the service finds it.
  credential = unit: name: file: {
    inherit name file;
    path = "/run/credentials/${unit}/${name}";
  };
  serverUnit = "paddock-server.service";
  workerUnit = "paddock-worker.service";
  orNull = f: x: if x == null then null else f x;
in
{
  # The option values a module user gets without setting anything.
  defaults = {
    server = {
      listen = "127.0.0.1:8980";
      workerListen = "127.0.0.1:8982";
      metricsListen = "127.0.0.1:8981";
      dataDir = "/var/lib/paddock";
      tls = null;
      tokens = [ ];
      certificates = [ ];
      jwt = null;
      allowAnonymous = false;
      database = null;
      settings = { };
    };
    worker = {
      scheduler = "grpc://127.0.0.1:8982";
      properties = { };
      maxConcurrentActions = null;
      workDir = "/var/lib/paddock-worker";
      tls = null;
      tokenFile = null;
      settings = { };
    };
  };

  # The files the server's unit loads as credentials.
  serverCredentials = { tls, tokens, jwt, database ? null, ... }:
    builtins.filter (c: c.file != null) (
      (if tls == null then [ ] else [
        (credential serverUnit "tls-cert" tls.certFile)
        (credential serverUnit "tls-key" tls.keyFile)
        (credential serverUnit "tls-client-ca" (tls.clientCaFile or null))
      ])
      ++ map (t: credential serverUnit "token-${t.name}" (t.tokenFile or null)) tokens
      ++ (if jwt == null then [ ] else [
        (credential serverUnit "jwt-secret" (jwt.secretFile or null))
        (credential serverUnit "jwt-jwks" (jwt.jwksFile or null))
      ])
      ++ (if database == null then [ ] else [
        (credential serverUnit "database-password" (database.passwordFile or null))
        (credential serverUnit "database-ca" (database.tlsCaFile or null))
      ]));

  # The files the worker's unit loads as credentials.
  workerCredentials = { tls, tokenFile, ... }:
    builtins.filter (c: c.file != null) (
      (if tls == null then [ ] else [
        (credential workerUnit "tls-ca" (tls.caFile or null))
        (credential workerUnit "tls-cert" (tls.certFile or null))
        (credential workerUnit "tls-key" (tls.keyFile or null))
      ])
      ++ [ (credential workerUnit "token" tokenFile) ]);

  # `paddock server --config` for services.paddock.server.
  server = { listen, workerListen, metricsListen, dataDir, tls, tokens, certificates, jwt, allowAnonymous, settings, database ? null, ... }:
    let
      path = name: file: orNull (_: "/run/credentials/${serverUnit}/${name}") file;
    in
    merge
      ({
        server = {
          inherit listen;
          worker_listen = workerListen;
          metrics_listen = metricsListen;
          data_dir = dataDir;
          local_workers = 0;
        } // (if tls == null then { } else {
          tls = removeNulls {
            cert_file = path "tls-cert" tls.certFile;
            key_file = path "tls-key" tls.keyFile;
            client_ca_file = path "tls-client-ca" (tls.clientCaFile or null);
          };
        });
        auth = removeNulls {
          allow_anonymous = allowAnonymous;
          tokens = map
            (t: removeNulls {
              inherit (t) name permissions;
              instances = t.instances or [ "*" ];
              token_file = path "token-${t.name}" (t.tokenFile or null);
              sha256 = t.sha256 or null;
            })
            tokens;
          certificates = map removeNulls certificates;
          jwt = orNull
            (j: removeNulls {
              inherit (j) issuer audience;
              secret_file = path "jwt-secret" (j.secretFile or null);
              jwks_file = path "jwt-jwks" (j.jwksFile or null);
            })
            jwt;
        };
      } // (if database == null then { } else {
        state = removeNulls {
          backend = "postgres";
          url = database.url or "postgresql:///paddock?host=/run/postgresql&user=paddock";
          password_file = path "database-password" (database.passwordFile or null);
          tls_ca_file = path "database-ca" (database.tlsCaFile or null);
        };
      }))
      settings;

  # `paddock worker --config` for services.paddock.worker.
  worker = { scheduler, properties, maxConcurrentActions, workDir, tls, tokenFile, settings, ... }:
    let
      path = name: file: orNull (_: "/run/credentials/${workerUnit}/${name}") file;
    in
    merge
      (withoutNulls {
        worker = {
          inherit scheduler properties;
          capacity = maxConcurrentActions;
          work_dir = workDir;
          credentials = removeNulls {
            tls_ca_file = path "tls-ca" (if tls == null then null else tls.caFile or null);
            tls_cert_file = path "tls-cert" (if tls == null then null else tls.certFile or null);
            tls_key_file = path "tls-key" (if tls == null then null else tls.keyFile or null);
            token_file = path "token" tokenFile;
          };
        };
      })
      settings;
}
