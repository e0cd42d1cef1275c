#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a circle.

    scripts/check-imports.py [ROOT]    (default: src, the library; src/bin/* skipped)

Reads `crate::a::b` and `super::x` paths in every .rs file under ROOT (braced groups
such as `use crate::{a, b::{c, d}}` expanded first), resolves each
to the longest module it names, and reports every strongly connected set of two or
more modules. A parent's `mod` declarations are not imports: children may use their
parent's items, and what a module declares it owns.
"""
import re,os,sys
root=sys.argv[1] if len(sys.argv)>1 else 'src'
def modname(path):
    rel=os.path.relpath(path,root)[:-3]
    parts=rel.split('/')
    if parts[-1] in ('mod','lib','main'): parts=parts[:-1]
    return '::'.join(parts)
mods={}
for dp,_,fs in os.walk(root):
    if root == 'src' and 'bin' in dp.split('/'): continue
    for f in fs:
        if f.endswith('.rs'):
            p=os.path.join(dp,f); mods[modname(p)]=open(p).read()
def top(m, depth):
    return '::'.join(m.split('::')[:depth])
def split_top(body):
    items,depth,cur=[],0,''
    for ch in body:
        if ch=='{': depth+=1
        elif ch=='}': depth-=1
        if ch==',' and depth==0: items.append(cur); cur=''
        else: cur+=ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]
def expand(prefix, body):
    out=[]
    for item in split_top(body):
        item=re.sub(r'\s+as\s+\w+$','',item)
        if item=='self': out.append(prefix); continue
        m=re.match(r'^([\w:]*?)::\{(.*)\}$', item, re.S)
        if m: out+=expand(prefix+'::'+m.group(1), m.group(2))
        else: out.append(prefix+'::'+item)
    return out
def expand_groups(src):
    # Rewrites every `crate::{…}` / `super::{…}` group as the paths it names.
    while True:
        m=re.search(r'\b(crate|super)((?:::\w+)*)::\{', src)
        if not m: return src
        start,depth,i=m.end(),1,m.end()
        while depth:
            depth+= {'{':1,'}':-1}.get(src[i],0); i+=1
        paths=expand(m.group(1)+m.group(2), src[start:i-1])
        src=src[:m.start()]+' '.join(paths)+src[i:]
mods={m:expand_groups(src) for m,src in mods.items()}
edges=set()
for m,src in mods.items():
    for ref in re.findall(r'crate::([a-z_]+(?:::[a-z_]+)*)', src):
        parts=ref.split('::')
        # resolve to the longest known module prefix
        target=None
        for i in range(len(parts),0,-1):
            cand='::'.join(parts[:i])
            if cand in mods: target=cand; break
        if target and target!=m and not m.startswith(target+'::') :
            edges.add((m,target))
    # super:: references
    for ref in re.findall(r'super::([a-z_]+)', src):
        parent='::'.join(m.split('::')[:-1]) if not os.path.basename(m)=='' else m
        base=parent if parent else ''
        cand=(base+'::'+ref) if base else ref
        if cand in mods and cand!=m: edges.add((m,cand))
# cycles between distinct modules (at every depth), via DFS SCC
import collections
g=collections.defaultdict(set)
for a,b in edges: g[a].add(b)
index={};low={};st=[];on=set();res=[];i=[0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
    for w in g[v]:
        if w not in index: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],index[w])
    if low[v]==index[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: res.append(sorted(comp))
for v in list(mods):
    if v not in index: sc(v)
for c in res:
    print('import circle: ' + ' <-> '.join(c))
if res:
    sys.exit(1)
print(f'no import circle among {len(mods)} modules under {root}')
