#!/bin/sh
# Assembles the final image's whole file system in the build stage (the final stage is FROM scratch): python and
# only the shared libraries it and the virtualenv's extensions load, the standard library without what a server
# never imports, CA certificates, the gate user, /app and /tmp. No shell, no package manager, no perl: about 100 MB
# less than the Debian base it comes from.
#   deploy/image/runtime_root.sh /runtime /opt/gate
set -eu
root=$1
venv=$2

python=$(readlink -f /usr/bin/python3)   # /usr/bin/python3.11
version=$(basename "$python")
stdlib=/usr/lib/$version

mkdir -p "$root/usr/bin" "$root/usr/lib/x86_64-linux-gnu" "$root/usr/lib64" "$root/etc" "$root/usr/share" \
  "$root/app/config" "$root/app/data" "$root/tmp" "$root/opt"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s usr/bin "$root/bin"
chmod 1777 "$root/tmp"

cp -a "$python" "$root/usr/bin/"
ln -s "$version" "$root/usr/bin/python3"
cp -a "$stdlib" "$root/usr/lib/"
cp -a "/etc/$version" "$root/etc/"   # Debian's sitecustomize lives there
(
  cd "$root$stdlib"
  rm -rf ensurepip idlelib lib2to3 pydoc_data distutils tkinter turtledemo turtle.py venv curses dbm test \
    lib-dynload/_test* lib-dynload/_xx* lib-dynload/xxlimited* lib-dynload/_ctypes_test* lib-dynload/_curses* \
    lib-dynload/readline* lib-dynload/_dbm* lib-dynload/nis* lib-dynload/ossaudiodev* lib-dynload/audioop*
)
cp -a "$venv" "$root/opt/"
# What no code path of Gate imports: plotly serves the usage report nothing but package_data/plotly.min.js
# (gate/usagesink/report.py); its figure classes, validators and Jupyter extension are about 50 MB.
# tests/test_image.py checks that the report's script is still served from the image.
for site in "$root$venv"/lib/python3*/site-packages; do
  rm -rf "$site/plotly/graph_objs" "$site/plotly/validators" "$site/plotly/labextension"
done

# Every system library that python, its extension modules and the wheels' shared objects link to.
{
  ldd "$python"
  find "$root$stdlib/lib-dynload" "$root$venv" -name '*.so*' -type f -exec ldd {} \; 2>/dev/null
} | awk '$2 == "=>" && $3 ~ /^\/(usr\/)?lib/ {print $3} $1 ~ /^\/lib64\/ld-linux/ {print $1}' | sort -u |
  while read -r lib; do
    cp -L "$lib" "$root/usr${lib#/usr}"
  done
echo /usr/lib/x86_64-linux-gnu >"$root/etc/ld.so.conf"
/sbin/ldconfig -r "$root"

# TLS trust (the system store, as python's default context reads it), name resolution, the gate user.
mkdir -p "$root/usr/lib/ssl"
cp -a /etc/ssl "$root/etc/"
cp -a /usr/share/ca-certificates "$root/usr/share/"
cp -a /usr/lib/ssl/. "$root/usr/lib/ssl/"
cp -a /etc/nsswitch.conf /etc/protocols /etc/services /etc/os-release "$root/etc/" 2>/dev/null || true
cp -a /usr/lib/os-release "$root/usr/lib/"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\ngate:x:10001:10001:gate:/app:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\ngate:x:10001:\n' >"$root/etc/group"
chown 10001:10001 "$root/app/data"
