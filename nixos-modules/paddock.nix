# NixOS module for Paddock: `services.paddock.server` runs the storage services and
# the scheduler; `services.paddock.worker` runs a worker that executes actions in
# containers. A worker on the same host as the server needs nothing but
# `enable = true`.
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
  workerConfig = toml.generate "paddock-worker.toml" (render.worker (cfg.worker // {
    workDir = "/var/lib/paddock-worker";
  }));
in
{
  options.services.paddock = {
    server = {
      enable = mkEnableOption "the Paddock server: CAS, ActionCache and scheduler";
      package = packageOption;
      listen = mkOption {
        type = types.str;
        default = defaults.server.listen;
        description = "Address of the gRPC services (REAPI and the worker protocol).";
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
        description = "Open the gRPC port in the firewall.";
      };
      settings = settingsOption "server";
    };

    worker = {
      enable = mkEnableOption "a Paddock worker, which runs actions in containers";
      package = packageOption;
      scheduler = mkOption {
        type = types.str;
        default = defaults.worker.scheduler;
        description = "The scheduler to take work from, grpc://HOST:PORT.";
      };
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
        after = [ "network.target" ];
        serviceConfig = {
          ExecStart = "${cfg.server.package}/bin/paddock server --config ${serverConfig}";
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

      networking.firewall.allowedTCPPorts = mkIf cfg.server.openFirewall [ (port cfg.server.listen) ];
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
