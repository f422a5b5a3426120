-- The 2503 hotfix rollup applies to a 2503 site (build 9135) until a newer update that
-- includes it is offered: then it is hidden.
SELECT CASE
    WHEN dbo.fnCurrentSiteVersion_INT() <> 5009135
        THEN PRINT('Not a 2503 build, skip this hotfix')
    WHEN EXISTS (SELECT 1 FROM CM_UpdatePackages
                 WHERE PackageGuid = '420E3E18-73C5-4BE9-88B0-6F1E30A012CA')
        THEN PRINT('Superseded by Configuration Manager 2509, hide this hotfix') + 2
    ELSE 1
END AS Applicable;
