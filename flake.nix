{
  description = "Paddock: a remote build execution farm that speaks REAPI v2";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      version = "0.1.0";
    in
    {
      packages = forAllSystems (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "paddock";
          inherit version;
          src = nixpkgs.lib.cleanSourceWith {
            src = self;
            # Rebuild for source changes only, not for docs or test workspaces.
            filter = path: type:
              let base = baseNameOf path; in
              !(type == "directory" && (base == "target" || base == "images"));
          };
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [ "--package" "paddock" ];
          # Protocols compile with protox (pure Rust) and seccomp filters with
          # seccompiler: no protoc, no system C libraries. The registry client's TLS
          # (rustls on aws-lc) compiles its C with the stdenv's compiler; cmake and
          # perl let aws-lc-sys use its full build where it wants to.
          nativeBuildInputs = [ pkgs.cmake pkgs.perl ];
          # The integration tests need root, namespaces, Nix and Bazel: they run in
          # `checks.vm` and in the repository's `tests/run`; the unit tests run in
          # `checks.tests`.
          doCheck = false;
          meta = {
            description = "A remote build execution farm that speaks REAPI v2";
            mainProgram = "paddock";
            platforms = nixpkgs.lib.platforms.linux;
          };
        };
      });

      apps = forAllSystems (pkgs:
        let
          paddock = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          run = name: command: {
            type = "app";
            program = "${pkgs.writeShellScript name ''exec ${paddock}/bin/paddock ${command} "$@"''}";
          };
        in
        {
          # `nix run github:...` starts the all-in-one farm with its defaults.
          default = run "paddock-up" "up";
          # `nix run .#worker -- --scheduler grpc://HOST:PORT` starts a worker.
          worker = run "paddock-worker" "worker";
          server = run "paddock-server" "server";
        });

      nixosModules.default = { lib, pkgs, ... }: {
        imports = [ ./nixos-modules/paddock.nix ];
        services.paddock.server.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        services.paddock.worker.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          # What `tests/run` needs; Bazel 4.2.3 comes from Debian in CI.
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            gcc
            python3
            nix
            pkgsStatic.busybox
            runc
            skopeo
            umoci
            distribution
          ];
        };
      });

      checks = forAllSystems (pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          paddock = self.packages.${system}.default;
        in
        {
          package = paddock;
          tests = paddock.overrideAttrs (_: {
            doCheck = true;
            cargoTestFlags = [ "--workspace" "--lib" ];
          });
          # A server and two workers; one runs an action in a Nix closure.
          vm = pkgs.testers.runNixOSTest {
            name = "paddock";
            defaults = {
              imports = [ self.nixosModules.default ];
              virtualisation.memorySize = 2048;
            };
            nodes = {
              server = {
                services.paddock.server = {
                  enable = true;
                  listen = "0.0.0.0:8980";
                  workerListen = "0.0.0.0:8982";
                  openFirewall = true;
                  # Test secrets: /etc files are fine for a throw-away VM.
                  tokens = [
                    { name = "ci"; tokenFile = "/etc/paddock/ci.token"; permissions = [ "cas.read" "cas.write" "ac.read" "ac.write" "execute" ]; }
                    { name = "workers"; tokenFile = "/etc/paddock/workers.token"; permissions = [ "worker" ]; }
                  ];
                };
                environment.etc."paddock/ci.token".text = "vm-test-ci-token";
                environment.etc."paddock/workers.token".text = "vm-test-workers-token";
                environment.systemPackages = [ paddock ];
              };
              worker1 = {
                services.paddock.worker = {
                  enable = true;
                  scheduler = "grpc://server:8982";
                  tokenFile = "/etc/paddock/workers.token";
                  properties.Pool = "one";
                };
                environment.etc."paddock/workers.token".text = "vm-test-workers-token";
                # The store path the action names; a static busybox has no other deps.
                environment.systemPackages = [ pkgs.pkgsStatic.busybox ];
              };
              worker2 = {
                services.paddock.worker = {
                  enable = true;
                  scheduler = "grpc://server:8982";
                  tokenFile = "/etc/paddock/workers.token";
                  properties.Pool = "two";
                };
                environment.etc."paddock/workers.token".text = "vm-test-workers-token";
              };
            };
            testScript = ''
              start_all()
              server.wait_for_unit("paddock-server.service")
              server.wait_for_open_port(8980)
              worker1.wait_for_unit("paddock-worker.service")
              worker2.wait_for_unit("paddock-worker.service")
              server.wait_until_succeeds(
                  "PADDOCK_TOKEN=vm-test-ci-token paddock exec --remote grpc://localhost:8980 --platform Pool=two "
                  + "--env PATH=/run/current-system/sw/bin -- true",
                  timeout=120,
              )
              out = server.succeed(
                  "PADDOCK_TOKEN=vm-test-ci-token paddock exec --remote grpc://localhost:8980 --platform Pool=one "
                  + "--platform nix-store-paths=${pkgs.pkgsStatic.busybox} "
                  + "--env PATH=${pkgs.pkgsStatic.busybox}/bin "
                  + "-- sh -c 'ls /nix/store; test ! -e /usr'"
              )
              assert "busybox" in out, out
            '';
          };
        });
    };
}
