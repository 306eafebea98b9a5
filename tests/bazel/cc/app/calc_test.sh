#!/bin/sh
set -eu
out=$(app/calc)
echo "$out"
echo "$out" | grep -qx 'version 1.2.3'
echo "$out" | grep -qx 'power 65536'
echo "$out" | grep -qx 'chain 210'
echo "$out" | grep -qx 'square 144'
app/greet remote execution | grep -qx '== REMOTE EXECUTION =='
echo "calc ok"
