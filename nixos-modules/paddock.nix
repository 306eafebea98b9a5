# NixOS module for Paddock: `services.paddock.server` runs the storage services and
# the scheduler; `services.paddock.worker` runs a worker that executes actions in
# containers. A worker on the same host as the server needs nothing but
# `enable = true`.
#
# Secrets (TLS keys, tokens, JWT secrets) are named by path, never put in the Nix
# store: systemd reads them as root (LoadCredential) into a directory only the
# service can read. A server reachable from the network needs tokens, client
# certificates or JWTs; the module refuses an open firewall without them.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkMerge mkOption types;
  cfg = config.services.paddock;
  toml = pkgs.formats.toml { };
  render = import ./settings.nix;
  defaults = render.defaults;
  port = address: lib.toInt (lib.last (lib.splitString ":" address));
  packageOption = mkOption {
    type = types.package;
    default = pkgs.paddock or (throw "services.paddock: set `package` (or use the flake's nixosModules.default)");
    defaultText = lib.literalExpression "pkgs.paddock";
    description = "The Paddock package to run.";
  };
  settingsOption = what: mkOption {
    type = toml.type;
    default = { };
    description = ''
      Settings merged into the ${what}'s configuration file, in the schema that
      `paddock config check` validates (see README.md, "Configuration").
    '';
  };
  serverConfig = toml.generate "paddock-server.toml" (render.server cfg.server);
  workerOptions = cfg.worker // { workDir = "/var/lib/paddock-worker"; };
  workerConfig = toml.generate "paddock-worker.toml" (render.worker workerOptions);
  loadCredentials = map (c: "${c.name}:${c.file}");
  secretOption = description: mkOption {
    type = types.nullOr types.str;
    default = null;
    example = "/run/keys/paddock";
    description = description + " A path outside the Nix store, readable by root.";
  };
  permissionsOption = mkOption {
    type = types.listOf (types.enum [ "cas.read" "cas.write" "ac.read" "ac.write" "execute" "admin" "worker" ]);
    description = "What the holder may do.";
  };
  instancesOption = mkOption {
    type = types.listOf types.str;
    default = [ "*" ];
    description = "Instance-name patterns the permissions apply to (`*` matches any text).";
  };
  authConfigured = cfg.server.tokens != [ ] || cfg.server.certificates != [ ] || cfg.server.jwt != null;
  loopback = address: lib.hasPrefix "127." address || lib.hasPrefix "[::1]" address || lib.hasPrefix "localhost" address;
  secrets = lib.filter (f: f != null) (
    (if cfg.server.tls == null then [ ] else [ cfg.server.tls.keyFile ])
    ++ map (t: t.tokenFile) cfg.server.tokens
    ++ (if cfg.server.jwt == null then [ ] else [ cfg.server.jwt.secretFile ])
    ++ (if cfg.server.database == null then [ ] else [ cfg.server.database.passwordFile ])
    ++ [ cfg.worker.tokenFile ]
    ++ (if cfg.worker.tls == null then [ ] else [ cfg.worker.tls.keyFile ]));
in
{
  options.services.paddock = {
    server = {
      enable = mkEnableOption "the Paddock server: CAS, ActionCache and scheduler";
      package = packageOption;
      listen = mkOption {
        type = types.str;
        default = defaults.server.listen;
        description = ''
          Address of the REAPI services. Anything but loopback needs `tokens`,
          `certificates` or `jwt` (or `allowAnonymous`).
        '';
      };
      workerListen = mkOption {
        type = types.str;
        default = defaults.server.workerListen;
        description = "Address of the worker protocol (and the CAS workers use).";
      };
      tls = mkOption {
        type = types.nullOr (types.submodule {
          options = {
            certFile = mkOption { type = types.str; description = "The server's certificate chain (PEM)."; };
            keyFile = mkOption { type = types.str; description = "Its private key (PEM), outside the Nix store."; };
            clientCaFile = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = "The CA whose client certificates identify their holders (mutual TLS).";
            };
          };
        });
        default = null;
        description = "TLS on every listener; the files are read again when they change.";
      };
      tokens = mkOption {
        type = types.listOf (types.submodule {
          options = {
            name = mkOption { type = types.str; description = "The identity's name."; };
            tokenFile = secretOption "A file holding the token.";
            sha256 = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = "Or the token's SHA-256 in hex (no secret on the server at all).";
            };
            permissions = permissionsOption;
            instances = instancesOption;
          };
        });
        default = [ ];
        description = "Bearer tokens and what their holders may do.";
      };
      certificates = mkOption {
        type = types.listOf (types.submodule {
          options = {
            subject = mkOption { type = types.nullOr types.str; default = null; example = "CN=builder-1"; description = "Subject attributes to match."; };
            san = mkOption { type = types.nullOr types.str; default = null; example = "DNS:builder-1.example.com"; description = "A subjectAltName to match."; };
            name = mkOption { type = types.nullOr types.str; default = null; description = "The identity's name (default: the common name)."; };
            permissions = permissionsOption;
            instances = instancesOption;
          };
        });
        default = [ ];
        description = "Client certificates (signed by tls.clientCaFile) and what their holders may do.";
      };
      jwt = mkOption {
        type = types.nullOr (types.submodule {
          options = {
            secretFile = secretOption "HS256: the shared secret.";
            jwksFile = mkOption { type = types.nullOr types.str; default = null; description = "RS256/ES256/EdDSA: the issuer's JWKS."; };
            issuer = mkOption { type = types.str; description = "The `iss` tokens must carry."; };
            audience = mkOption { type = types.str; description = "An `aud` tokens must carry."; };
          };
        });
        default = null;
        description = "JSON Web Tokens as bearer tokens (claims: see SECURITY.md).";
      };
      allowAnonymous = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Serve callers without credentials on an address that is not loopback: anyone
          who reaches the port may do anything. Only on a network that is itself trusted.
        '';
      };
      database = mkOption {
        type = types.nullOr (types.submodule {
          options = {
            url = mkOption {
              type = types.str;
              default = "postgresql:///paddock?host=/run/postgresql&user=paddock";
              description = ''
                The PostgreSQL database the servers share. The default reaches a
                `services.postgresql` on this machine over its Unix socket, as the
                `paddock` user (peer authentication, no password).
              '';
            };
            passwordFile = secretOption "The database user's password, if it needs one.";
            tlsCaFile = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = ''
                The CA that signed the database's certificate: the connection then
                uses TLS and checks the certificate and host name against it. Unset:
                TLS as the URL's `sslmode` says (`require`: checked against the
                system's roots).
              '';
            };
          };
        });
        default = null;
        example = lib.literalExpression "{ }";
        description = ''
          Keep the workers' records and the ActionCache in PostgreSQL, so that several
          servers (on this machine or others) share them. Unset: in this server
          (the records under dataDir).
        '';
      };
      metricsListen = mkOption {
        type = types.str;
        default = defaults.server.metricsListen;
        description = "Address of the Prometheus /metrics endpoint.";
      };
      dataDir = mkOption {
        type = types.str;
        default = defaults.server.dataDir;
        description = "Where blobs and action results are stored.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the gRPC ports (clients' and workers') in the firewall.";
      };
      settings = settingsOption "server";
    };

    worker = {
      enable = mkEnableOption "a Paddock worker, which runs actions in containers";
      package = packageOption;
      scheduler = mkOption {
        type = types.str;
        default = defaults.worker.scheduler;
        description = "The scheduler's worker address, grpc://HOST:PORT (grpcs:// for TLS).";
      };
      tls = mkOption {
        type = types.nullOr (types.submodule {
          options = {
            caFile = mkOption { type = types.nullOr types.str; default = null; description = "The CA that signed the scheduler's certificate (default: the system's roots)."; };
            certFile = mkOption { type = types.nullOr types.str; default = null; description = "The worker's client certificate (PEM)."; };
            keyFile = mkOption { type = types.nullOr types.str; default = null; description = "Its private key (PEM), outside the Nix store."; };
          };
        });
        default = null;
        description = "How the worker checks the scheduler, and its client certificate.";
      };
      tokenFile = secretOption "The worker's bearer token (an identity with the `worker` permission).";
      properties = mkOption {
        type = types.attrsOf (types.either types.str (types.listOf types.str));
        default = defaults.worker.properties;
        example = { Pool = "linux-large"; };
        description = "Platform properties offered on top of the detected ones.";
      };
      maxConcurrentActions = mkOption {
        type = types.nullOr types.ints.positive;
        default = defaults.worker.maxConcurrentActions;
        description = "How many actions run at once; the number of CPUs when null.";
      };
      settings = settingsOption "worker";
    };
  };

  config = mkMerge [
    {
      assertions = [
        {
          assertion = !(cfg.server.enable && cfg.server.openFirewall && !authConfigured && !cfg.server.allowAnonymous);
          message = ''
            services.paddock.server.openFirewall exposes the farm without authentication:
            anyone who reaches it could write the cache and pose as a worker. Configure
            services.paddock.server.tokens, .certificates or .jwt (see SECURITY.md), or
            set .allowAnonymous = true if the network itself is trusted.
          '';
        }
        {
          assertion = !(cfg.server.enable && !authConfigured && !cfg.server.allowAnonymous
            && !(loopback cfg.server.listen && loopback cfg.server.workerListen));
          message = ''
            services.paddock.server listens beyond loopback without authentication, which
            paddock refuses. Configure .tokens, .certificates or .jwt, or set
            .allowAnonymous = true if the network itself is trusted.
          '';
        }
        {
          assertion = lib.all (f: !(lib.hasPrefix "/nix/store" f)) secrets;
          message = "services.paddock: keys and tokens must not be in the Nix store, which every user can read.";
        }
      ];
    }
    (mkIf cfg.server.enable {
      users.users.paddock = {
        isSystemUser = true;
        group = "paddock";
        home = cfg.server.dataDir;
      };
      users.groups.paddock = { };

      systemd.services.paddock-server = {
        description = "Paddock remote build execution server";
        wantedBy = [ "multi-user.target" ];
        # A database on this machine is started first; one elsewhere is waited for
        # (state.connect_timeout).
        after = [ "network.target" ]
          ++ lib.optional (cfg.server.database != null && config.services.postgresql.enable) "postgresql.service";
        serviceConfig = {
          ExecStart = "${cfg.server.package}/bin/paddock server --config ${serverConfig}";
          # Keys and tokens, readable by this service alone.
          LoadCredential = loadCredentials (render.serverCredentials cfg.server);
          User = "paddock";
          Group = "paddock";
          StateDirectory = "paddock";
          StateDirectoryMode = "0750";
          Restart = "on-failure";
          # It serves the network and writes its data directory; nothing else.
          CapabilityBoundingSet = "";
          NoNewPrivileges = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          ReadWritePaths = [ cfg.server.dataDir ];
          LimitNOFILE = 65536;
        };
      };

      networking.firewall.allowedTCPPorts = mkIf cfg.server.openFirewall [
        (port cfg.server.listen)
        (port cfg.server.workerListen)
      ];
    })

    (mkIf cfg.worker.enable {
      systemd.services.paddock-worker = {
        description = "Paddock worker";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" "nix-daemon.socket" ] ++ lib.optional cfg.server.enable "paddock-server.service";
        wants = [ "nix-daemon.socket" ];
        # nix-store for Nix platforms; the worker realises store paths through the daemon.
        path = [ config.nix.package ];
        serviceConfig = {
          ExecStart = "${cfg.worker.package}/bin/paddock worker --config ${workerConfig}";
          LoadCredential = loadCredentials (render.workerCredentials workerOptions);
          # It creates containers: namespaces, mounts and cgroups need root.
          User = "root";
          StateDirectory = "paddock-worker";
          StateDirectoryMode = "0700";
          # The worker manages the cgroups of its actions below its own.
          Delegate = "yes";
          # Stopping the service kills every action with it.
          KillMode = "control-group";
          Restart = "on-failure";
          RestartSec = 2;
          LimitNOFILE = 1048576;
          ProtectHome = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectClock = true;
        };
      };
    })
  ];
}
