# A toolchain image built by Nix, for farms whose users make images with Nix:
#
#   nix-build images/toolchain.nix
#   skopeo copy docker-archive:result docker://REGISTRY/toolchain:TAG
#
# then pin the digest skopeo prints in the action's platform, e.g.
#   container-image=docker://REGISTRY/toolchain@sha256:...
# (The tests do not build this one: it needs nixpkgs, which CI does not have.)
{ pkgs ? import <nixpkgs> { } }:

pkgs.dockerTools.buildLayeredImage {
  name = "paddock-toolchain";
  tag = "latest";
  # buildLayeredImage gives popular store paths layers of their own, so images that
  # share them share those layers on the workers too.
  contents = with pkgs; [
    bashInteractive
    coreutils
    findutils
    gnugrep
    gnused
    gawk
    gzip
    gnutar
    gcc
    binutils
  ];
  config = {
    Env = [ "PATH=/bin" ];
  };
}
