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
in
{
  # The option values a module user gets without setting anything.
  defaults = {
    server = {
      listen = "0.0.0.0:8980";
      metricsListen = "127.0.0.1:8981";
      dataDir = "/var/lib/paddock";
      settings = { };
    };
    worker = {
      scheduler = "grpc://127.0.0.1:8980";
      properties = { };
      maxConcurrentActions = null;
      workDir = "/var/lib/paddock-worker";
      settings = { };
    };
  };

  # `paddock server --config` for services.paddock.server.
  server = { listen, metricsListen, dataDir, settings, ... }:
    merge
      {
        server = {
          inherit listen;
          metrics_listen = metricsListen;
          data_dir = dataDir;
          local_workers = 0;
        };
      }
      settings;

  # `paddock worker --config` for services.paddock.worker.
  worker = { scheduler, properties, maxConcurrentActions, workDir, settings, ... }:
    merge
      (withoutNulls {
        worker = {
          inherit scheduler properties;
          capacity = maxConcurrentActions;
          work_dir = workDir;
        };
      })
      settings;
}
